"""The training configuration: pydantic models of the YAML file, loaded in one place.

Every guide snippet holds only a ``runtime:`` section; everything else has defaults, so
each snippet runs as it is. :func:`load_config` is the one place a file is read: plain
``yaml.safe_load``, size and shape limits, then the models (``extra="forbid"``, strict
types) and the guide's rules, all reported as :class:`ConfigError` before any episode.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationError

from .errors import ConfigError
from .retention import make_policy

__all__ = [
    "DEFAULT_MAX_ENVS_TO_VISIT",
    "DEFAULT_TOP_K",
    "AgentConfig",
    "Config",
    "EnvironmentConfig",
    "RuntimeConfig",
    "ValidationConfig",
    "dump_config",
    "load_config",
    "parse_overrides",
]

# A guide snippet without max_envs_to_visit must still finish quickly: the guide calls
# runs under 100 episodes "quick experiments".
DEFAULT_MAX_ENVS_TO_VISIT = 100
# top_k_val without checkpoint_keep_last (the guide's "Validation scores not tracked" fix
# sets no K): keep 3, the guide's own top-k example and its "minimum: 3" advice.
DEFAULT_TOP_K = 3
BUILTIN_DATASET = "built-in"

# A configuration is a few hundred bytes; these limits only stop hostile or broken
# files (alias bombs, megabytes of nesting) before they cost memory or a deep traceback.
_MAX_FILE_BYTES = 1024 * 1024
_MAX_DEPTH = 32
_MAX_NODES = 100_000


class _Section(BaseModel):
    # strict: "5" is not silently an int, "yes" not a bool; YAML already gives real types.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class RuntimeConfig(_Section):
    """The ``runtime:`` section: training length, validation, checkpointing, writer."""

    max_envs_to_visit: PositiveInt | None = Field(
        default=None,
        description=f"episodes in total; default {DEFAULT_MAX_ENVS_TO_VISIT}, or "
        f"{DEFAULT_MAX_ENVS_TO_VISIT} more than the checkpoint when resuming",
    )
    checkpoint_dir: str | None = Field(
        default="checkpoints",
        description="checkpoints directory, relative to the run directory; null: no checkpoints",
    )
    checkpoint_every_episodes: PositiveInt | None = None
    checkpoint_keep_last: int | None = None
    checkpoint_strategy: Literal["all", "last_n", "top_k_val"] | None = None
    checkpoint_on_start: bool = False
    resume_from: str | None = None
    validation_freq: PositiveInt | None = None
    run_validation_at_start: bool = False
    max_pending: PositiveInt = 2
    on_backlog: Literal["block", "coalesce"] = "block"
    on_error: Literal["raise", "warn"] = "raise"
    fsync: bool = True
    executor: Literal["auto", "thread", "process"] = Field(
        default="auto",
        description="where checkpoint writes run: a writer process (auto on POSIX) or a thread",
    )

    def episodes_for(self, start_episode: int) -> int:
        """The last episode of a run starting after ``start_episode`` (0 unless resumed)."""
        if self.max_envs_to_visit is not None:
            return self.max_envs_to_visit
        return start_episode + DEFAULT_MAX_ENVS_TO_VISIT


class AgentConfig(_Section):
    """The ``agent:`` section: a built-in agent name or a ``module:Class`` path."""

    type: str = "HistoryAgent"
    memory_type: str = "history"
    config: dict[str, Any] = Field(default_factory=dict)


class EnvironmentConfig(_Section):
    """The ``environment:`` section: the built-in deterministic arithmetic tasks."""

    type: Literal["arithmetic"] = "arithmetic"
    seed: int = 0
    num_tasks: PositiveInt = Field(default=200, le=1000)
    max_operand: PositiveInt = Field(default=20, le=1000)
    max_attempts: PositiveInt = Field(default=2, le=100)


class ValidationConfig(_Section):
    """The ``validation:`` section: what ``validation_freq`` evaluates the agent on."""

    validation_dataset: str | None = BUILTIN_DATASET
    size: PositiveInt = Field(default=50, le=10_000)


class Config(_Section):
    """A whole training configuration file."""

    run_name: str | None = None
    output_dir: str = "outputs"
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    _source: str = PrivateAttr(default="<config>")

    @property
    def name(self) -> str:
        """The run name (always set by :func:`load_config`)."""
        return self.run_name or "run"

    @property
    def source(self) -> str:
        """Where the configuration came from (the file), for messages."""
        return self._source


# -- loading ---------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Read, validate and resolve a configuration file.

    Args:
        path: the YAML file.
        overrides: ``"runtime.KEY=VALUE"`` strings (``--set``); the value is YAML.

    Returns:
        the frozen configuration; ``run_name`` defaults to the file's stem and, under
        ``top_k_val`` without ``checkpoint_keep_last``, K is :data:`DEFAULT_TOP_K`.

    Raises:
        ConfigError: the file cannot be read or parsed, a key is unknown (the closest
            valid key is suggested), a value has the wrong type, or a rule of the
            checkpointing guide is broken. The message names the file and the key.
    """
    src = str(path)
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {src}") from None
    except OSError as exc:
        raise ConfigError(f"Config file {src} cannot be read: {exc.strerror}") from None
    if p.is_dir():
        raise ConfigError(f"Config file {src} is a directory; pass a YAML file")
    if size > _MAX_FILE_BYTES:
        raise ConfigError(
            f"{src}: {size} bytes is too large for a config file (limit {_MAX_FILE_BYTES})"
        )
    try:
        with open(p, "rb") as f:
            # stat() says 0 bytes for /dev/zero or a pipe: bound the read itself too.
            raw = f.read(_MAX_FILE_BYTES + 1)
        if len(raw) > _MAX_FILE_BYTES:
            raise ConfigError(
                f"{src}: more than {_MAX_FILE_BYTES} bytes is too large for a config file"
            )
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{src}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"Config file {src} cannot be read: {exc.strerror}") from None
    data = _parse_yaml(text, src)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{src}: the top level must be a mapping (e.g. `runtime:`), "
            f"found {_kind(data)}"
        )
    for section in ("runtime", "agent", "environment", "validation"):
        # `runtime:` with every key commented out is an empty section, as an empty file
        # is an empty config.
        if section in data and data[section] is None:
            data[section] = {}
    set_keys = _apply_overrides(data, overrides)
    if data.get("run_name") is None:
        data["run_name"] = p.stem
    return build_config(data, source=src, set_keys=set_keys)


def build_config(
    data: Mapping[str, Any], *, source: str = "<config>", set_keys: Mapping[str, str] | None = None
) -> Config:
    """Validate an already parsed document (what :func:`load_config` does after parsing).

    Raises:
        ConfigError: see :func:`load_config`.
    """
    _check_shape(data, source)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source, set_keys or {})) from None
    cfg._source = source
    return _check_rules(cfg)


def _flow_depth(text: str) -> int:
    # Deep flow nesting ("[[[[...") makes the parser recurse until RecursionError, which
    # is slow to unwind; count brackets first (brackets in quoted text only over-count).
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice is an error rather than silently the last one.

    Pasting two of the guide's snippets into one file gives two ``runtime:`` blocks; the
    first would vanish without a word.
    """

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # unhashable keys: the base loader reports them
            if key in seen:
                raise _DuplicateKey(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, src: str) -> Any:
    if _flow_depth(text) > _MAX_DEPTH:
        raise ConfigError(f"{src}: the document is nested too deeply (limit {_MAX_DEPTH} levels)")
    try:
        # A SafeLoader subclass: plain data only, no Python tags.
        return yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{src}{_mark(exc.problem_mark)}: {exc.problem}; merge the two blocks into one"
        ) from None
    except yaml.constructor.ConstructorError as exc:
        tag = str(exc.problem or "")
        where = _mark(exc.problem_mark)
        if "python/" in tag or "!!python" in text:
            raise ConfigError(
                f"{src}{where}: Python tags (!!python/...) are not allowed; "
                "a config file holds plain YAML data only"
            ) from None
        raise ConfigError(f"{src}{where}: unsupported YAML: {tag}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{src}{_mark(mark)}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(
            f"{src}: the document is nested too deeply (limit {_MAX_DEPTH} levels)"
        ) from None


def _mark(mark: Any) -> str:
    if mark is None:
        return ""
    return f" line {mark.line + 1}, column {mark.column + 1}"


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def _check_shape(data: Any, src: str) -> None:
    # Walks shared (aliased) nodes once per reference, so an alias bomb hits the node
    # limit after _MAX_NODES steps instead of expanding.
    stack: list[tuple[Any, int]] = [(data, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > _MAX_NODES:
            raise ConfigError(
                f"{src}: the document is too large (more than {_MAX_NODES} values; "
                "YAML aliases count once per use)"
            )
        if depth > _MAX_DEPTH:
            raise ConfigError(f"{src}: the document is nested too deeply (limit {_MAX_DEPTH})")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ConfigError(f"{src}: key {k!r} is not a string; quote it")
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


# -- overrides -------------------------------------------------------------------------


def parse_overrides(overrides: Iterable[str]) -> list[tuple[list[str], Any, str]]:
    """Split ``KEY=VALUE`` strings into (key path, YAML value, original text).

    Raises:
        ConfigError: an override is not ``KEY=VALUE`` or its value is not plain YAML.
    """
    out: list[tuple[list[str], Any, str]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(
                f"--set {item!r}: expected KEY=VALUE, e.g. --set runtime.max_envs_to_visit=200"
            )
        out.append((parts, _parse_yaml(value, f"--set {item}"), item))
    return out


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    set_keys: dict[str, str] = {}
    for parts, value, item in parse_overrides(overrides):
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {item!r}: {where} is not a section")
            node = child
        node[parts[-1]] = value
        set_keys[".".join(parts)] = item
    return set_keys


# -- error messages --------------------------------------------------------------------


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _explain(exc: ValidationError, src: str, set_keys: Mapping[str, str]) -> str:
    lines: list[str] = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        dotted = ".".join(loc)
        via = [v for k, v in set_keys.items() if k == dotted or k.startswith(dotted + ".")]
        origin = f"--set {via[0]}" if via else src
        if err["type"] == "extra_forbidden":
            lines.append(_unknown_key(loc, origin))
            continue
        got = err.get("input")
        shown = "nothing" if err["type"] == "missing" else repr(got)
        lines.append(f"{origin}: {dotted}: {err['msg']} (got {shown})")
    return "\n".join(lines)


def _unknown_key(loc: list[str], origin: str) -> str:
    key = loc[-1]
    msg = f"Unknown key '{'.'.join(loc)}' in {origin}"
    parent = _model_at(loc[:-1])
    candidates = _valid_keys(parent) if parent else []
    # A truncated key ("max_env") is best matched by the key it starts; else by similarity.
    close = [c for c in candidates if c.startswith(key)][:1] or difflib.get_close_matches(
        key, candidates, n=1, cutoff=0.6)
    if close:
        return f"{msg}; did you mean {close[0]}?"
    if not loc[:-1] and key in RuntimeConfig.model_fields:
        return f"{msg}; did you mean runtime.{key}? (it belongs under `runtime:`)"
    if candidates:
        return f"{msg}; valid keys here: {', '.join(candidates)}"
    return msg


# -- the guide's rules -----------------------------------------------------------------


def _check_rules(cfg: Config) -> Config:
    rt, src = cfg.runtime, cfg.source

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{src}: {msg}")

    _check_plain_name(cfg.run_name or "", "run_name", src)
    if not cfg.output_dir or "\x00" in cfg.output_dir:
        raise fail("output_dir must be a directory path, e.g. output_dir: outputs")
    if rt.checkpoint_dir is None:
        used = [k for k in ("checkpoint_every_episodes", "checkpoint_keep_last",
                            "checkpoint_strategy") if getattr(rt, k) is not None]
        if rt.checkpoint_on_start:
            used.append("checkpoint_on_start")
        if used:
            raise fail(
                f"runtime.checkpoint_dir is null (checkpointing off) but {', '.join(used)} "
                "is set; set checkpoint_dir: checkpoints to save checkpoints"
            )
    else:
        _check_checkpoint_dir(rt.checkpoint_dir, src)

    if rt.checkpoint_strategy == "top_k_val":
        if rt.validation_freq is None:
            raise fail(
                "Validation scores not tracked: checkpoint_strategy top_k_val keeps the "
                "best checkpoints by validation score, but validation is off. "
                "Set runtime.validation_freq (e.g. validation_freq: 50) to enable validation"
            )
        if cfg.validation.validation_dataset is None:
            raise fail(
                "Validation scores not tracked: checkpoint_strategy top_k_val needs a "
                "validation_dataset, but validation.validation_dataset is null. "
                f"Set validation.validation_dataset: {BUILTIN_DATASET} (or a JSONL file)"
            )
    elif rt.checkpoint_strategy == "all" and rt.checkpoint_keep_last is not None:
        raise fail(
            "Old checkpoints not deleted: strategy mismatch. checkpoint_strategy all keeps "
            f"every checkpoint, so checkpoint_keep_last: {rt.checkpoint_keep_last} has no "
            "effect. Set checkpoint_strategy: last_n to keep only the newest "
            f"{rt.checkpoint_keep_last}, or remove checkpoint_keep_last"
        )
    if cfg.validation.validation_dataset is None and (
        rt.validation_freq is not None or rt.run_validation_at_start
    ):
        raise fail(
            "validation is enabled (validation_freq / run_validation_at_start) but "
            f"validation.validation_dataset is null; set it to {BUILTIN_DATASET} or a JSONL file"
        )
    keep_last = rt.checkpoint_keep_last
    if rt.checkpoint_strategy == "top_k_val" and keep_last is None:
        keep_last = DEFAULT_TOP_K
    try:
        # The retention module owns the strategy rules (keep_last > 0, last_n needs N).
        make_policy(rt.checkpoint_strategy, keep_last)
    except ConfigError as exc:
        why = "Old checkpoints not deleted: " if keep_last is not None and keep_last <= 0 else ""
        raise fail(f"{why}runtime.{exc}") from None
    if keep_last != rt.checkpoint_keep_last:
        cfg = cfg.model_copy(
            update={"runtime": rt.model_copy(update={"checkpoint_keep_last": keep_last})}
        )
    return cfg


def _check_plain_name(value: str, key: str, src: str) -> None:
    if not value or value in {".", ".."} or "/" in value or "\\" in value or "\x00" in value:
        raise ConfigError(
            f"{src}: {key} {value!r} must be a plain directory name, e.g. {key}: my_run"
        )


def _check_checkpoint_dir(value: str, src: str) -> None:
    if not value.strip() or "\x00" in value:
        raise ConfigError(
            f"{src}: runtime.checkpoint_dir {value!r} is unusable; "
            "use a directory name such as checkpoint_dir: checkpoints"
        )
    pure = PurePath(value)
    if not pure.is_absolute() and ".." in pure.parts:
        raise ConfigError(
            f"{src}: runtime.checkpoint_dir {value!r} is unusable: it leaves the run "
            "directory, so runs would share (and lock) one checkpoints directory. "
            "Use a name inside the run directory, e.g. checkpoints, or an absolute path"
        )


def dump_config(cfg: Config) -> str:
    """The resolved configuration as YAML (what a run stores in ``config.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
