"""Pydantic validation errors to :class:`ConfigError` text, with did-you-mean hints.

The models' stage of :func:`ckptwriter.config.load_config` hands its
``ValidationError`` here. Each error becomes one line naming where the value came from
(the file, or the ``--set`` override that set it) and the dotted key; an unknown key gets
the closest valid key, or the list of valid keys. The root model is passed in, so this
module does not import the models.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ValidationError

__all__ = ["explain_validation_error"]


def explain_validation_error(
    exc: ValidationError, src: str, set_keys: Mapping[str, str], root: type[BaseModel]
) -> str:
    """The message for a failed validation of a config document.

    Args:
        exc: what ``root.model_validate`` raised.
        src: the file the document came from.
        set_keys: dotted keys set by ``--set`` mapped to the override's text.
        root: the model of the whole document (its fields are the top-level sections).

    Returns:
        one line per error: origin, dotted key, what was wrong and the value found.
    """
    lines: list[str] = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        dotted = ".".join(loc)
        via = [v for k, v in set_keys.items() if k == dotted or k.startswith(dotted + ".")]
        origin = f"--set {via[0]}" if via else src
        if err["type"] == "extra_forbidden":
            lines.append(_unknown_key(loc, origin, root))
            continue
        got = err.get("input")
        shown = "nothing" if err["type"] == "missing" else repr(got)
        msg = err["msg"]
        if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            # pydantic says "a valid dictionary or instance of RuntimeConfig": the class
            # is ours, not the user's; a section is keys indented under its name.
            msg = (f"expected a mapping of settings (`{loc[-1]}:` then `key: value` lines "
                   "indented under it)")
        lines.append(f"{origin}: {dotted}: {msg} (got {shown})")
    return "\n".join(lines)


def _model_at(loc: Sequence[str | int], root: type[BaseModel]) -> type[BaseModel] | None:
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _unknown_key(loc: list[str], origin: str, root: type[BaseModel]) -> str:
    key = loc[-1]
    msg = f"Unknown key '{'.'.join(loc)}' in {origin}"
    parent = _model_at(loc[:-1], root)
    candidates = _valid_keys(parent) if parent else []
    # A truncated key ("max_env") is best matched by the key it starts; else by similarity.
    close = [c for c in candidates if c.startswith(key)][:1] or difflib.get_close_matches(
        key, candidates, n=1, cutoff=0.6)
    if close:
        return f"{msg}; did you mean {close[0]}?"
    runtime = _model_at(["runtime"], root)
    if not loc[:-1] and runtime is not None and key in runtime.model_fields:
        return f"{msg}; did you mean runtime.{key}? (it belongs under `runtime:`)"
    if candidates:
        return f"{msg}; valid keys here: {', '.join(candidates)}"
    return msg
