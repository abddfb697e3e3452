"""The named logs and the agent state of a checkpoint, rebuilt from the bytes read.

``agent.json`` lists them (its ``logs`` and ``state`` sections; a checkpoint without
them has none); ``runtime.json`` holds each file's size and sha256, checked by the full
read before anything here runs. A model-typed state value comes back as the caller's
class (``state_types=``) or, with ``raw=True``, as plain data; a checkpoint never
causes code to be imported.
"""

from __future__ import annotations

import msgspec

from .agent_state import AgentState
from .entry_codec import entry_types as entry_types_of
from .errors import CheckpointCorruptError, CheckpointError, UnknownStateTypeError
from .layout import AGENT_JSON, STREAM_NAME_RE
from .manifest import AgentManifest
from .memory import MemoryLog
from .state_codec import EncodedValue, decode_value, fingerprint

__all__ = ["refuse_dropped_fields", "restore_sections"]


def _take(blobs: dict[str, bytes], name: str, shown: str, taken: set[str]) -> bytes:
    if name in taken:
        raise CheckpointCorruptError(
            shown, AGENT_JSON, f"names {name} twice (two logs or state keys share one file)")
    taken.add(name)
    try:
        return blobs.pop(name)
    except KeyError:
        raise CheckpointCorruptError(
            shown, AGENT_JSON, f"names {name}, which runtime.json does not list") from None


def _checked_name(name: str, what: str, shown: str) -> str:
    if STREAM_NAME_RE.match(name) is None:
        raise CheckpointCorruptError(shown, AGENT_JSON, f"has an invalid {what} name {name!r}")
    if what == "log" and name == "memory":
        raise CheckpointCorruptError(
            shown, AGENT_JSON, "has a log named 'memory', a name the writer never gives one")
    return name


def refuse_dropped_fields(agent: AgentManifest, file: str, data: bytes,
                          entry_types: tuple[type, ...], shown: str, *, raw: bool) -> None:
    """Refuse to load ``data`` (a log's file) through a class that would drop fields.

    agent.json records each entry class's schema fingerprint. Where the class passed has
    another one (its fields changed since), the entries of that tag are checked for keys
    it does not have: decoding would silently drop them. A class that only gained fields
    (with defaults) loads as before. Costs nothing while the fingerprints match.

    Raises:
        CheckpointError: an entry holds a field the class passed does not have.
    """
    if raw or not entry_types or not agent.entry_types:
        return
    by_tag = entry_types_of(entry_types).by_tag
    changed = {tag: by_tag[tag] for tag, rec in agent.entry_types.items()
               if rec.fingerprint and tag in by_tag
               and fingerprint(by_tag[tag].cls) != rec.fingerprint}
    if not changed:
        return
    fields = {tag: {f.encode_name for f in msgspec.structs.fields(c.mirror)} | {"type"}
              for tag, c in changed.items()}
    for n, line in enumerate(data.splitlines(), 1):
        try:
            entry = msgspec.json.decode(line)
        except msgspec.DecodeError:
            return  # the decode proper reports it, with its line
        tag = entry.get("type") if isinstance(entry, dict) else None
        if tag in changed and (extra := sorted(entry.keys() - fields[tag])):
            rec, cls = agent.entry_types[tag], changed[tag].cls
            raise CheckpointError(
                f"{shown} ({file}) line {n}: an entry of type {tag!r} has fields "
                f"{', '.join(extra)}, which {cls.__module__}:{cls.__qualname__} (passed in "
                f"entry_types=) does not have: it was written by {rec.class_} with other "
                "fields (the schema fingerprints differ), and loading would drop them. "
                "Pass the class it was written with, add the fields to yours, or read it "
                "with load_checkpoint(path, raw=True).")


def _refuse_dropped_state(key: str, enc: EncodedValue, mirror: type, shown: str) -> None:
    """A model-typed value with fields the class passed lacks (decoding would drop them)."""
    try:
        data = msgspec.json.decode(enc.data)
    except msgspec.DecodeError:
        return  # the decode proper reports it
    known = {f.encode_name for f in msgspec.structs.fields(mirror)} | {"type"}
    if isinstance(data, dict) and (extra := sorted(data.keys() - known)):
        raise CheckpointError(
            f"{shown}: state[{key!r}] has fields {', '.join(extra)}, which the class passed "
            f"in state_types= for its tag {enc.tag!r} does not have: it was written by "
            f"{enc.cls} with other fields, and loading would drop them. Pass the class it "
            "was written with, add the fields to yours, or read it with raw=True.")


def restore_sections(
    agent: AgentManifest, blobs: dict[str, bytes], shown: str, *,
    entry_types: tuple[type, ...], state_types: tuple[type, ...], raw: bool,
) -> tuple[dict[str, MemoryLog], AgentState]:
    """The logs and state ``agent`` lists; their files are taken out of ``blobs``.

    Raises:
        CheckpointCorruptError: a file is missing from the manifest or is not valid.
        UnknownEntryTypeError: a log holds a tag no class in ``entry_types`` has.
        UnknownStateTypeError: a model-typed key's class was not passed (not ``raw``).
    """
    logs: dict[str, MemoryLog] = {}
    taken: set[str] = set()
    for name, rec in agent.logs.items():
        _checked_name(name, "log", shown)
        data = _take(blobs, rec.file, shown, taken)
        try:
            logs[name] = MemoryLog.from_jsonl(
                data, memory_type=rec.memory_type, entry_types=entry_types, raw=raw,
                source=f"checkpoint {shown} ({rec.file})")
        except ValueError as exc:
            raise CheckpointCorruptError(shown, rec.file, str(exc)) from None
        # After the decode proper: a field that changed type is reported as such first.
        refuse_dropped_fields(agent, rec.file, data, entry_types, shown, raw=raw)
    types = entry_types_of(state_types)
    values = []
    for key, srec in agent.state.items():
        _checked_name(key, "state key", shown)
        enc = EncodedValue(srec.kind, _take(blobs, srec.file, shown, taken), srec.class_,
                           srec.tag)
        if srec.kind == "model" and not raw and (srec.tag or "") not in types.by_tag:
            raise UnknownStateTypeError(shown, key, srec.class_ or "?", srec.tag or "",
                                        [c.__name__ for c in types.classes] or ["none"])
        try:
            obj = decode_value(enc, types, raw=raw)
        except ValueError as exc:
            raise CheckpointCorruptError(shown, srec.file, f"state[{key!r}]: {exc}") from None
        if srec.kind == "model" and not raw:
            _refuse_dropped_state(key, enc, types.by_tag[srec.tag or ""].mirror, shown)
        values.append((key, obj, enc))
    return logs, AgentState._restored(values)
