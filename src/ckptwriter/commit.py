"""The one commit pipeline: what a checkpoint is, written once above every backend.

For each captured snapshot, in one blocking call: decide whether the previous memory
file can be extended (same log, still intact), write the bytes appended since then
(the backend copies the prefix: a kernel-side copy or reflink locally, a server-side
copy remotely) while the sha256 state carried from the previous commit is extended,
write ``agent.json`` and the extra files, then ``runtime.json`` last as the commit
marker (:meth:`PendingCheckpoint.finalize`), move ``latest``, and run a retention pass.

The backend owns atomicity and durability; this module owns the format.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import msgspec

from . import layout
from .discovery import guarded
from .errors import CheckpointError
from .layout import FORMAT_VERSION
from .manifest import dump_json, format_timestamp
from .reader import is_whole, scan
from .retention import CheckpointRecord, RetentionPolicy, select_for_deletion
from .snapshot import CapturedSnapshot, SnapshotMeta
from .storage.base import Backend, FileSpec, PendingCheckpoint, ReuseToken

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["CommitPipeline", "CommitReport"]

# Above this size, hashing runs in another thread while this one writes and fsyncs:
# both release the GIL, so a full write costs what a raw write + fsync costs.
_PARALLEL_HASH_BYTES = 8 * 1024 * 1024


class CommitReport(msgspec.Struct, frozen=True):
    """What one commit did; crosses the pipe from the writer process as it is."""

    name: str
    path: str
    episode_index: int
    val_score: float | None
    bytes_written: int
    bytes_serialized: int
    entries_serialized: int
    incremental: bool
    serialize_seconds: float
    write_seconds: float
    deleted: tuple[str, ...]
    retention_error: str | None
    log_id: str
    nbytes: int
    # The next commit can extend this memory file (the backend can reuse it).
    extendable: bool = True

    @property
    def record(self) -> CheckpointRecord:
        """The retention view of the new checkpoint."""
        return CheckpointRecord(self.name, self.episode_index, self.val_score)


@dataclass(slots=True)
class _Carry:
    """The memory file of the last commit, which the next one may extend."""

    log_id: str
    entries: int
    nbytes: int
    sha: _Hash
    token: ReuseToken


def commit_documents(
    snap: SnapshotMeta, name: str, mem_name: str, entries: int, files: Mapping[str, object]
) -> tuple[bytes, bytes]:
    """``runtime.json`` and ``latest.json`` of a checkpoint, as every backend writes them."""
    timestamp = format_timestamp(snap.timestamp)
    runtime = dump_json({
        "timestamp": timestamp,
        "episode_index": snap.episode_index,
        "train_steps_total": snap.train_steps_total,
        "agent_type": snap.agent_type,
        "memory_snapshot_path": mem_name,
        "val_score": snap.val_score,
        "format_version": FORMAT_VERSION,
        "memory_entries": entries,
        "resumed_from": snap.resumed_from,
        "files": files,
    })
    latest = dump_json({
        "checkpoint": name, "episode_index": snap.episode_index,
        "timestamp": timestamp, "val_score": snap.val_score,
    })
    return runtime, latest


def _hash_views(sha: _Hash, views: Sequence[memoryview]) -> None:
    for v in views:
        sha.update(v)


class CommitPipeline:
    """Commit, pointer update and retention for one checkpoints directory (blocking).

    Args:
        backend: where checkpoints go.
        policy: which checkpoints retention keeps.
        protect: names retention never deletes.
    """

    def __init__(self, backend: Backend, policy: RetentionPolicy,
                 protect: Collection[str] = ()) -> None:
        self.backend = backend
        self.policy = policy
        self.protect = frozenset(protect)
        self.known: dict[str, CheckpointRecord] = {}
        self._carry: _Carry | None = None
        # An immutable copy of ``known``, replaced whole after each change, for readers
        # in other threads (the writer's event loop) while a commit runs.
        self.committed: tuple[CheckpointRecord, ...] = ()

    def open(self) -> list[CheckpointRecord]:
        """Lock the directory, clean a crash's leftovers, learn what is committed there."""
        b = self.backend
        b.open(partial(is_whole, b.store))
        try:
            infos = guarded(b.store, b.root, "opening", lambda: scan(b.store, b.root))
            records = [i.record for i in infos if i.complete]
        except BaseException:
            b.close()
            raise
        self.known = {r.name: r for r in records}
        self.committed = tuple(records)
        return records

    def close(self) -> None:
        """Release the directory lock."""
        self.backend.close()

    def persist(self, snap: CapturedSnapshot) -> CommitReport:
        """Commit ``snap``, point ``latest`` at it, then delete what retention selects.

        Raises:
            StorageError: the checkpoint could not be written (nothing of it is visible).
            NeedFullMemory: the capture holds only a delta that the previous file no
                longer matches (the writer process asks its parent for everything).
        """
        t0 = time.perf_counter()
        meta, mem, b = snap.meta, snap.memory, self.backend
        name = layout.checkpoint_name(meta.episode_index)
        mem_name = layout.memory_file_name(meta.episode_index)
        carry = self._carry
        if not (carry is not None and carry.log_id == mem.log_id
                and carry.nbytes <= mem.nbytes and b.can_reuse(carry.token)):
            carry = None
        start = carry.nbytes if carry is not None else 0
        views = list(mem.iter_bytes(start))
        sha = carry.sha.copy() if carry is not None else hashlib.sha256()
        pending: PendingCheckpoint | None = None
        try:
            pending = b.begin(name)
            spec = FileSpec(mem_name, views, carry.token if carry is not None else None)
            if mem.nbytes - start >= _PARALLEL_HASH_BYTES:
                hasher = threading.Thread(target=_hash_views, args=(sha, views),
                                          name="ckptwriter-hash")
                hasher.start()
                try:
                    tokens = pending.write([spec])
                finally:
                    hasher.join()
            else:
                _hash_views(sha, views)
                tokens = pending.write([spec])
            b._step("memory_written")
            files: dict[str, dict[str, object]] = {
                mem_name: {"bytes": mem.nbytes, "sha256": sha.hexdigest()}
            }
            others = [("agent.json", meta.agent_json), *meta.extra_files.items()]
            pending.write([FileSpec(n, [data]) for n, data in others])
            for n, data in others:
                files[n] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            b._step("files_written")
            s0 = time.perf_counter()
            runtime, latest_json = commit_documents(meta, name, mem_name, mem.entries, files)
            serialize_s = time.perf_counter() - s0
            path = pending.finalize(runtime)
        except BaseException as exc:
            if pending is not None:
                pending.discard()
            if isinstance(exc, OSError):
                # What the backend did not word itself (a fault between its steps).
                where = b.store.join(b.root, name)
                raise b.store.error(exc, "writing checkpoint", where) from exc
            raise
        self._carry = _Carry(mem.log_id, mem.entries, mem.nbytes, sha, tokens[mem_name])
        record = CheckpointRecord(name, meta.episode_index, meta.val_score)
        # Known before the pointer moves: if that fails, retention still sees it later.
        self.known[name] = record
        self.committed = tuple(self.known.values())
        b.replace_pointer(name, latest_json)
        deleted, retention_error = self._retain(name)
        try:
            extendable = b.can_reuse(tokens[mem_name])
        except Exception:
            extendable = False  # only a hint for the next hand-over; the commit is done
        total = time.perf_counter() - t0
        return CommitReport(
            name=name, path=path, episode_index=meta.episode_index, val_score=meta.val_score,
            bytes_written=mem.nbytes + sum(len(d) for _, d in others) + len(runtime),
            bytes_serialized=mem.nbytes - start,
            entries_serialized=mem.entries - (carry.entries if carry is not None else 0),
            incremental=carry is not None, serialize_seconds=serialize_s,
            write_seconds=total - serialize_s, deleted=tuple(deleted),
            retention_error=retention_error, log_id=mem.log_id, nbytes=mem.nbytes,
            extendable=extendable,
        )

    def _retain(self, newest: str) -> tuple[list[str], str | None]:
        doomed = select_for_deletion(
            list(self.known.values()), self.policy, protected=self.protect | {newest}
        )
        deleted: list[str] = []
        error = None
        for name in doomed:
            try:
                self.backend.delete(name)
            except CheckpointError as exc:
                # The new checkpoint is durable; this one stays known and is tried again
                # on the next pass. The others are still deleted now.
                error = str(exc)
                continue
            del self.known[name]
            deleted.append(name)
        self.committed = tuple(self.known.values())
        return deleted, error
