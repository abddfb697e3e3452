"""Does what a checkpoint holds still fit the classes passed: a changed class is no damage.

A checkpoint records the class of each entry tag and its schema fingerprint
(``agent.json``), and the class path of each model-typed state value. A class whose
fields changed since (one renamed, removed, added without a default, or given another
type) no longer fits the values written through it. That is not damage (the checksums
match, ``ckptwriter verify`` finds the checkpoint whole), and an older checkpoint is no
answer: ``latest`` must not fall back past it as past a broken one. This module tells the
two apart and raises :class:`~ckptwriter.ClassMismatchError` naming the field, what the
checkpoint holds, what the class expects and the fix.

- Entries (the memory, the logs): only tags whose fingerprint differs from the class
  passed are checked, line by line, before the decode proper; equal fingerprints cost
  nothing, and a line that does not fit an unchanged class stays damage.
- State values (one object each): a model value that parses as a JSON object but does
  not load through the class passed is a changed class (its bytes were checked).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from .entry_codec import entry_types as entry_types_of
from .entry_schema import Codec
from .errors import ClassMismatchError
from .manifest import AgentManifest
from .state_codec import class_path, fingerprint

__all__ = ["misfit", "refuse_changed_entries", "refuse_changed_state"]

_EXPECTED_GOT = re.compile(r"^Expected (.+), got (.+)$")


def _names(fields: list[str]) -> str:
    listed = ", ".join(f"`{f}`" for f in fields)
    return f"the field {listed}" if len(fields) == 1 else f"the fields {listed}"


def misfit(value: dict[str, Any], data: bytes, mirror: type, noun: str
           ) -> tuple[str, str] | None:
    """Why the stored object ``value`` (its JSON ``data``; ``noun``: "entry", "value") does
    not fit the class whose mirror is ``mirror``, and the fix; None if it fits.

    A field the object has and the class lacks is a misfit too: loading would drop it.
    """
    fields = msgspec.structs.fields(mirror)
    known = {f.encode_name for f in fields} | {"type"}
    missing = [f.encode_name for f in fields if f.required and f.encode_name not in value]
    extra = sorted(value.keys() - known)
    if missing or extra:
        parts = []
        if missing:
            has = sorted(value.keys() - {"type"})
            held = "" if extra else (f" (it has {_names(has)})" if has else " (it has none)")
            parts.append(f"the class requires {_names(missing)}, which the {noun} lacks{held}")
        if extra:
            parts.append(f"the {noun} has {_names(extra)}, which the class does not have "
                         "(loading would drop it)")
        fixes = []
        if missing and extra:
            fixes.append(f"rename {_names(missing)} back to "
                         + ", ".join(f"`{f}`" for f in extra))
        elif extra:
            fixes.append(f"add {_names(extra)} back to the class")
        if missing:
            fixes.append(f"give {_names(missing)} a default")
        return ", and ".join(parts), ", or ".join(fixes)
    try:
        msgspec.json.decode(data, type=mirror)
    except msgspec.ValidationError as exc:
        problem, _, at = str(exc).partition(" - at `$")
        field = at.rstrip("`").lstrip(".") or "?"
        m = _EXPECTED_GOT.match(problem)
        what = (f"the class expects {m.group(1)} and the {noun} holds {m.group(2)}" if m
                else f"the class refuses the {noun}'s value ({problem})")
        return (f"field `{field}`: {what}",
                f"give `{field}` back the type it was written with, or one that takes both")
    return None


def refuse_changed_entries(agent: AgentManifest, file: str, data: bytes,
                           entry_types: tuple[type, ...], shown: str, section: str) -> None:
    """Refuse a log's file (``data``) with an entry its tag's class, changed since the
    checkpoint was written, cannot load (or would load with fields dropped).

    Raises:
        ClassMismatchError: an entry does not fit its tag's class (the first one found).
    """
    if not entry_types or not agent.entry_types:
        return
    by_tag = entry_types_of(entry_types).by_tag
    changed: dict[str, Codec] = {
        tag: by_tag[tag] for tag, rec in agent.entry_types.items()
        if rec.fingerprint and tag in by_tag
        and fingerprint(by_tag[tag].cls) != rec.fingerprint}
    if not changed:
        return
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = msgspec.json.decode(line)
        except msgspec.DecodeError:
            return  # damage: the decode proper reports it, with its line
        tag = entry.get("type") if isinstance(entry, dict) else None
        if tag not in changed:
            continue
        found = misfit(entry, line, changed[tag].mirror, "entry")
        if found is not None:
            raise ClassMismatchError(
                section, shown, f"{file}, line {n}", tag,
                class_path(changed[tag].cls), agent.entry_types[tag].class_, *found)


def refuse_changed_state(key: str, file: str, data: bytes, tag: str, written_by: str,
                         codec: Codec, shown: str, *, refused: str | None = None) -> None:
    """Refuse a model-typed state value that does not fit the class passed for its tag.

    Args:
        refused: why the class refused the value when it was decoded, if it did (a
            validator of the class, say): a value of a JSON object is then a misfit too.

    Raises:
        ClassMismatchError: it lacks a field the class requires, has one it lacks, holds
            a value of another type, or (``refused``) the class refuses it.
    """
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return  # damage: the decode proper reports it
    if not isinstance(value, dict):
        return
    found = misfit(value, data, codec.mirror, "value")
    if found is None and refused is not None:
        found = (f"the class refuses it ({refused})",
                 "make it accept the value it was written with")
    if found is not None:
        raise ClassMismatchError("State", shown, f"state[{key!r}], {file}", tag,
                                 class_path(codec.cls), written_by, *found)
