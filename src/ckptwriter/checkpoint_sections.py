"""The named logs and the agent state of a checkpoint, rebuilt from the bytes read.

``agent.json`` lists them (its ``logs`` and ``state`` sections; a checkpoint without
them has none); ``runtime.json`` holds each file's size and sha256, checked by the full
read before anything here runs. A model-typed state value comes back as the caller's
class (``state_types=``) or, with ``raw=True``, as plain data; a checkpoint never
causes code to be imported.
"""

from __future__ import annotations

from .agent_state import AgentState
from .class_fit import refuse_changed_entries, refuse_changed_state
from .entry_codec import entry_types as entry_types_of
from .errors import CheckpointCorruptError, UnknownStateTypeError
from .layout import AGENT_JSON, STREAM_NAME_RE
from .manifest import AgentManifest
from .memory import MemoryLog
from .state_codec import EncodedValue, decode_value

__all__ = ["load_log", "restore_sections"]


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


def load_log(agent: AgentManifest, file: str, data: bytes, *, memory_type: str,
             entry_types: tuple[type, ...], raw: bool, shown: str, section: str) -> MemoryLog:
    """The memory or a named log of a checkpoint, from its file's bytes.

    Entries whose class changed since the checkpoint was written are checked first: one
    that no longer fits (a field renamed, removed, added without a default, of another
    type, or one loading would drop) is a class mismatch, not damage.

    Raises:
        ClassMismatchError: an entry does not fit its tag's class, changed since.
        UnknownEntryTypeError: the file holds a tag no class in ``entry_types`` has.
        CheckpointCorruptError: a line is not a valid entry of its (unchanged) class.
    """
    if not raw:
        refuse_changed_entries(agent, file, data, entry_types, shown, section)
    try:
        return MemoryLog.from_jsonl(data, memory_type=memory_type, entry_types=entry_types,
                                    raw=raw, source=f"checkpoint {shown} ({file})")
    except ValueError as exc:
        raise CheckpointCorruptError(shown, file, str(exc)) from None


def restore_sections(
    agent: AgentManifest, blobs: dict[str, bytes], shown: str, *,
    entry_types: tuple[type, ...], state_types: tuple[type, ...], raw: bool,
) -> tuple[dict[str, MemoryLog], AgentState]:
    """The logs and state ``agent`` lists; their files are taken out of ``blobs``.

    Raises:
        CheckpointCorruptError: a file is missing from the manifest or is not valid.
        ClassMismatchError: an entry or a state value does not fit its class, changed
            since the checkpoint was written.
        UnknownEntryTypeError: a log holds a tag no class in ``entry_types`` has.
        UnknownStateTypeError: a model-typed key's class was not passed (not ``raw``).
    """
    logs: dict[str, MemoryLog] = {}
    taken: set[str] = set()
    for name, rec in agent.logs.items():
        _checked_name(name, "log", shown)
        logs[name] = load_log(agent, rec.file, _take(blobs, rec.file, shown, taken),
                              memory_type=rec.memory_type, entry_types=entry_types, raw=raw,
                              shown=shown, section=f"Log {name!r}")
    types = entry_types_of(state_types)
    values = []
    for key, srec in agent.state.items():
        _checked_name(key, "state key", shown)
        enc = EncodedValue(srec.kind, _take(blobs, srec.file, shown, taken), srec.class_,
                           srec.tag)
        model = srec.kind == "model" and not raw
        if model and (srec.tag or "") not in types.by_tag:
            raise UnknownStateTypeError(shown, key, srec.class_ or "?", srec.tag or "",
                                        [c.__name__ for c in types.classes] or ["none"])
        # A model value's bytes were checked: one its class cannot load means the class
        # changed since (a field renamed, removed, added, retyped), not damage.
        if model:
            fit = (key, srec.file, enc.data, srec.tag or "", srec.class_ or "?",
                   types.by_tag[srec.tag or ""], shown)
            refuse_changed_state(*fit)
        try:
            obj = decode_value(enc, types, raw=raw)
        except ValueError as exc:
            if model:  # an object the class refuses all the same (a validator, say)
                refuse_changed_state(*fit, refused=str(exc))
            raise CheckpointCorruptError(shown, srec.file, f"state[{key!r}]: {exc}") from None
        values.append((key, obj, enc))
    return logs, AgentState._restored(values)
