"""The public API: exactly the documented names, typed, and usable from sync code."""

from __future__ import annotations

from pathlib import Path

import ckptwriter
from ckptwriter import MemoryLog, SyncCheckpointWriter, load_checkpoint
from conftest import add_episode, snapshot

EXPORTED = {
    "Action", "AgentState", "CheckpointCorruptError", "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFallbackWarning",
    "CheckpointHandle", "CheckpointInfo", "CheckpointNotFoundError", "CheckpointResult",
    "CheckpointWriter", "ClassMismatchError", "ConfigError", "DirectoryLockedError", "Feedback",
    "FeedbackContent",
    "LoadedCheckpoint", "MemoryEntry", "MemoryLog", "MemoryTypeMismatchError", "Observation",
    "Reflection", "Snapshot", "StorageError", "SyncCheckpointHandle", "SyncCheckpointWriter",
    "UnknownEntryTypeError", "UnknownStateTypeError", "UnsafePathError", "WriterClosedError",
    "WriterFailedError",
    "WriterStats",
    "list_checkpoints", "load_checkpoint", "resolve_checkpoint", "switch_interval",
    "verify_checkpoint",
}


def test_exported_names() -> None:
    """__all__ is exactly the documented public API, and every name resolves."""
    assert set(ckptwriter.__all__) == EXPORTED
    for name in EXPORTED:
        assert getattr(ckptwriter, name) is not None


def test_every_error_derives_from_the_root() -> None:
    """One exception hierarchy: every exported error is a CheckpointError."""
    for name in EXPORTED:
        obj = getattr(ckptwriter, name)
        if isinstance(obj, type) and name.endswith("Error"):
            assert issubclass(obj, ckptwriter.CheckpointError), name


def test_package_is_typed() -> None:
    """py.typed ships with the package."""
    assert (Path(ckptwriter.__file__).parent / "py.typed").exists()


def test_sync_writer_round_trip(tmp_path: Path) -> None:
    """SyncCheckpointWriter writes from a plain loop; wait() blocks until durable."""
    mem = MemoryLog()
    with SyncCheckpointWriter(tmp_path, keep_last=2) as w:
        for ep in range(1, 6):
            add_episode(mem, ep)
            h = w.submit(snapshot(mem, ep))
        r = h.wait()
        assert r.episode_index == 5
        w.flush()
    assert w.stats.written == 5
    assert sorted(p.name for p in tmp_path.glob("ep_*")) == ["ep_000004", "ep_000005"]
    assert load_checkpoint(tmp_path).memory.to_jsonl() == mem.to_jsonl()
