"""Config text to plain data: bounded reading, strict YAML, ``--set`` overrides.

The first stage of :func:`ckptwriter.config.load_config`: the file is read within a size
limit, parsed by a ``yaml.SafeLoader`` that rejects duplicate keys, checked for depth and
size, and the ``--set`` overrides are merged in. Nothing here knows the models; every
problem is a :class:`ConfigError` naming the file (or the override) and the place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "apply_overrides",
    "check_shape",
    "describe_kind",
    "parse_overrides",
    "parse_yaml",
    "read_config_file",
]

# A configuration is a few hundred bytes; these limits only stop hostile or broken
# files (alias bombs, megabytes of nesting) before they cost memory or a deep traceback.
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_NODES = 100_000


def read_config_file(path: str | os.PathLike[str]) -> str:
    """The text of a config file, read within :data:`MAX_FILE_BYTES`.

    Args:
        path: the YAML file.

    Returns:
        the file's UTF-8 text.

    Raises:
        ConfigError: the file is missing, unreadable, a directory, too large or not
            UTF-8.
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
    if size > MAX_FILE_BYTES:
        raise ConfigError(
            f"{src}: {size} bytes is too large for a config file (limit {MAX_FILE_BYTES})"
        )
    try:
        with open(p, "rb") as f:
            # stat() says 0 bytes for /dev/zero or a pipe: bound the read itself too.
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError(
                f"{src}: more than {MAX_FILE_BYTES} bytes is too large for a config file"
            )
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{src}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"Config file {src} cannot be read: {exc.strerror}") from None


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


def parse_yaml(text: str, src: str) -> Any:
    """Plain data from YAML text: safe tags only, no duplicate keys, bounded nesting.

    Args:
        text: the YAML document.
        src: where it came from (a file name or ``--set ...``), for messages.

    Returns:
        the parsed document (``None`` for an empty one).

    Raises:
        ConfigError: the text is not valid YAML, repeats a key, uses Python tags or is
            nested more than :data:`MAX_DEPTH` levels.
    """
    if _flow_depth(text) > MAX_DEPTH:
        raise ConfigError(f"{src}: the document is nested too deeply (limit {MAX_DEPTH} levels)")
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
            f"{src}: the document is nested too deeply (limit {MAX_DEPTH} levels)"
        ) from None


def _mark(mark: Any) -> str:
    if mark is None:
        return ""
    return f" line {mark.line + 1}, column {mark.column + 1}"


def describe_kind(value: Any) -> str:
    """``value``'s YAML kind for a message: "a list", "a string", "a number"..."""
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def check_shape(data: Any, src: str) -> None:
    """Check parsed data's size and depth, and that every mapping key is a string.

    Raises:
        ConfigError: more than :data:`MAX_NODES` values, deeper than :data:`MAX_DEPTH`,
            or a key that is not a string.
    """
    # Walks shared (aliased) nodes once per reference, so an alias bomb hits the node
    # limit after MAX_NODES steps instead of expanding.
    stack: list[tuple[Any, int]] = [(data, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ConfigError(
                f"{src}: the document is too large (more than {MAX_NODES} values; "
                "YAML aliases count once per use)"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(f"{src}: the document is nested too deeply (limit {MAX_DEPTH})")
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
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A path whose name is not UTF-8 (the shell passes bytes): a config is text,
            # and config.yaml records every value, so it cannot hold one.
            shown = item.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise ConfigError(
                f"--set {shown}: the value is not valid UTF-8 text (a file name in another "
                "encoding?), which a config cannot hold; rename it, or name it through a "
                "symlink whose name is UTF-8 (ln -s <it> <name>)"
            ) from None
        out.append((parts, parse_yaml(value, f"--set {item}"), item))
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Merge ``--set`` overrides into ``data`` in place.

    Returns:
        each dotted key set, mapped to the override that set it (for messages).

    Raises:
        ConfigError: see :func:`parse_overrides`; or a key's parent is not a section.
    """
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
