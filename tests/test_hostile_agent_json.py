"""A hostile or damaged agent.json (with checksums that match) never leads a load outside
the checkpoint or to a file runtime.json does not vouch for."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckptwriter import (
    AgentState,
    CheckpointCorruptError,
    MemoryLog,
    Observation,
    Snapshot,
    SyncCheckpointWriter,
    load_checkpoint,
)

Edit = Callable[[dict[str, Any]], None]


def _write(tmp_path: Path) -> Path:
    memory = MemoryLog([Observation(content="q")])
    chat = MemoryLog([Observation(content="hello")])
    state = AgentState(skills={"add": 1}, blob=b"\x00\x01")
    (tmp_path / "outside.json").write_text('{"secret": 1}')
    with SyncCheckpointWriter(tmp_path / "ck", executor="thread", fsync=False) as writer:
        writer.submit(Snapshot(1, 1, "A", memory, logs={"chat": chat}, state=state)).wait()
    return tmp_path / "ck" / "ep_000001"


def _rewrite(ckpt: Path, edit: Edit) -> None:
    """Change agent.json and make runtime.json's checksum match it again."""
    agent = json.loads((ckpt / "agent.json").read_bytes())
    edit(agent)
    data = json.dumps(agent).encode()
    (ckpt / "agent.json").unlink()  # a shared (hard-linked) file: never edited in place
    (ckpt / "agent.json").write_bytes(data)
    runtime = json.loads((ckpt / "runtime.json").read_bytes())
    runtime["files"]["agent.json"] = {"bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "runtime.json").unlink()
    (ckpt / "runtime.json").write_text(json.dumps(runtime))


def _state_file(name: str) -> Edit:
    def edit(agent: dict[str, Any]) -> None:
        agent["state"]["skills"]["file"] = name
    return edit


def _log_file(name: str) -> Edit:
    def edit(agent: dict[str, Any]) -> None:
        agent["logs"]["chat"]["file"] = name
    return edit


def _set(section: str, key: str, value: Any) -> Edit:
    def edit(agent: dict[str, Any]) -> None:
        agent[section][key] = value
    return edit


HOSTILE: dict[str, Edit] = {
    "state file outside (..)": _state_file("../../outside.json"),
    "state file absolute": _state_file("/etc/passwd"),
    "state file in a subdirectory": _state_file("sub/state.skills.json"),
    "state file not listed": _state_file("state.other.json"),
    "state file is the memory": _state_file("memory_1.jsonl"),
    "state file is runtime.json": _state_file("runtime.json"),
    "state file is agent.json": _state_file("agent.json"),
    "two keys, one file": _set("state", "again", {"file": "state.skills.json", "kind": "json"}),
    "state key with a dot": _set("state", "a.b", {"file": "state.blob.bin", "kind": "bytes"}),
    "state key ..": _set("state", "..", {"file": "state.blob.bin", "kind": "bytes"}),
    "unknown kind": _set("state", "skills", {"file": "state.skills.json", "kind": "pickle"}),
    "bytes read as json": _set("state", "blob", {"file": "state.blob.bin", "kind": "json"}),
    "log file outside": _log_file("../outside.json"),
    "log file not listed": _log_file("log.other.jsonl"),
    "log file is the memory": _log_file("memory_1.jsonl"),
    "log file is a state file": _log_file("state.skills.json"),
    "log named memory/..": _set("logs", "../x", {"file": "log.chat.jsonl", "entries": 1}),
    "state section not a mapping": _set("state", "skills", ["state.skills.json"]),
}


@pytest.mark.parametrize("edit", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_agent_json_is_a_corrupt_checkpoint(tmp_path: Path, edit: Edit) -> None:
    ckpt = _write(tmp_path)
    assert load_checkpoint(ckpt).state["skills"] == {"add": 1}
    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointCorruptError) as info:
        load_checkpoint(ckpt)
    assert "agent.json" in str(info.value) or "state." in str(info.value) \
        or "log." in str(info.value)
    assert "secret" not in str(info.value)


def test_a_huge_recorded_entry_count_allocates_nothing(tmp_path: Path) -> None:
    """The recorded counts are informational: a forged one neither fails nor allocates."""
    ckpt = _write(tmp_path)
    _rewrite(ckpt, lambda agent: agent["logs"]["chat"].update(entries=10**15))
    assert [e.content for e in load_checkpoint(ckpt).logs["chat"]] == ["hello"]
