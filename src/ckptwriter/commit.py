"""The one commit pipeline: what a checkpoint is, written once above every backend.

For each captured snapshot, in one blocking call: for the memory and each named log,
decide whether the previous commit's file can be extended (same log, still intact) and
write the bytes appended since then (the backend copies the prefix: a kernel-side copy
or reflink locally, a server-side copy remotely) while the sha256 state carried from the
previous commit is extended; write ``agent.json``, the state keys and the extra files,
each linked from the previous checkpoint instead when it is unchanged
(:mod:`ckptwriter.commit_files`); then ``runtime.json`` last as the commit marker
(:meth:`PendingCheckpoint.finalize`), move ``latest``, move ``best`` if the new
checkpoint beats it, and run a retention pass.

The best checkpoint is the one with the best ``val_score`` by the writer's ``mode``
(``max`` or ``min``), ties going to the newer episode: :func:`best_of`, the rule
``top_k_val`` ranks by. Checkpoints without a score are never best, and without any
scored checkpoint there is no ``best`` pointer. Retention never deletes a checkpoint
the ``best`` pointer names (or may still name, after a failed move), and the pointer is
put right at open when what is on disk says otherwise (a crash between ``latest`` and
``best``, a re-commit, a writer of the other ``mode``).

The backend owns atomicity and durability; this module owns the format.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from functools import partial

import msgspec
from pydantic import ValidationError

from . import layout
from .commit_files import Carries, Plan, Stage, WholeFile
from .discovery import guarded
from .errors import CheckpointError, StorageError
from .latest_repair import repair_latest
from .layout import FORMAT_VERSION
from .manifest import MAX_DOCUMENT_BYTES, LatestPointer, dump_json, format_timestamp
from .memory import MemoryCapture
from .reader import is_whole, scan
from .retention import (
    CheckpointRecord,
    KeepTopKByScore,
    Mode,
    RetentionPolicy,
    select_for_deletion,
)
from .snapshot import CapturedSnapshot, SnapshotMeta
from .storage.base import Backend, PendingCheckpoint, ReuseToken

__all__ = ["CommitPipeline", "CommitReport", "best_of"]

log = logging.getLogger("ckptwriter")

_PREPARE_MIN_BYTES = 1024 * 1024  # smaller files copy in well under a millisecond


class CommitReport(msgspec.Struct, frozen=True):
    """What one commit did; crosses the pipe from the writer process as it is."""

    name: str
    path: str
    episode_index: int
    val_score: float | None
    # Bytes this commit really wrote: appended bytes of the logs, changed files whole,
    # runtime.json. A linked file and a reused prefix count in bytes_reused instead.
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
    # The best pointer could not be moved (the commit itself is durable).
    best_error: str | None = None
    # Bytes reached by reuse (prefixes copied, files linked) and files linked whole.
    bytes_reused: int = 0
    files_linked: int = 0
    # Named logs the next commit can extend: name -> (log_id, nbytes).
    logs_extendable: dict[str, tuple[str, int]] = {}
    # State keys whose files the next commit can link: key -> version.
    state_kept: dict[str, str] = {}
    # Spent after the previous commit copying ahead the memory prefix this commit
    # extended (storage/local_prepare.py); not in write_seconds.
    prepare_seconds: float = 0.0
    # The next commit's prefix is being copied ahead: a Ready follows this report.
    preparing: bool = False

    @property
    def record(self) -> CheckpointRecord:
        """The retention view of the new checkpoint."""
        return CheckpointRecord(self.name, self.episode_index, self.val_score)


def best_of(records: Iterable[CheckpointRecord], mode: Mode) -> CheckpointRecord | None:
    """The best scored checkpoint by ``mode``, ties to the newer; None if none has a score.

    The very rule ``top_k_val`` keeps by: the best one is always among its top K.
    """
    scored = [r for r in records if r.val_score is not None]
    if not scored:
        return None
    return scored[KeepTopKByScore(1, mode).should_preserve(scored).index(True)]


def _out_of_space(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)


def _pointer_document(name: str, episode: int, timestamp: str | None,
                      score: float | None) -> bytes:
    """``latest.json`` (and ``best.json``: the same schema) naming checkpoint ``name``."""
    return dump_json({
        "checkpoint": name, "episode_index": episode, "timestamp": timestamp,
        "val_score": score,
    })


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
    return runtime, _pointer_document(name, snap.episode_index, timestamp, snap.val_score)


class CommitPipeline:
    """Commit, pointer update and retention for one checkpoints directory (blocking).

    Args:
        backend: where checkpoints go.
        policy: which checkpoints retention keeps.
        protect: names retention never deletes.
        mode: ``max`` or ``min``: which ``val_score`` the ``best`` pointer follows.
        stage: how a stream written whole reaches the backend (see ``Stage``).
    """

    def __init__(self, backend: Backend, policy: RetentionPolicy,
                 protect: Collection[str] = (), *, mode: Mode = "max",
                 stage: Stage | None = None) -> None:
        self.backend = backend
        self.policy = policy
        self.protect = frozenset(protect)
        self.mode: Mode = mode
        self.known: dict[str, CheckpointRecord] = {}
        # Each known checkpoint's pointer document, which best.json holds when it is best.
        self._docs: dict[str, bytes] = {}
        self.best: CheckpointRecord | None = None
        # What the best pointer on disk may name: more than one name after a failed move.
        # Retention spares them all until a move succeeds.
        self._best_named: set[str] = set()
        # A checkpoint joined ``known`` without being ranked (its latest move failed).
        self._rank_all = False
        self._carries = Carries(stage)
        # Failed background removals taken by a commit's out-of-space retry, for the
        # retention pass that reports them.
        self._reclaim_errors: list[str] = []
        # The memory file the next commit will likely extend (prepare()).
        self._next_prefix: ReuseToken | None = None
        # An immutable copy of ``known``, replaced whole after each change, for readers
        # in other threads (the writer's event loop) while a commit runs.
        self.committed: tuple[CheckpointRecord, ...] = ()

    def open(self) -> list[CheckpointRecord]:
        """Lock the directory, clean a crash's leftovers, learn what is committed there."""
        b = self.backend
        b.open(partial(is_whole, b.store))
        try:
            infos = guarded(b.store, b.root, "opening", lambda: scan(b.store, b.root))
            whole = [i for i in infos if i.complete]
            records = [i.record for i in whole]
            self.known = {r.name: r for r in records}
            self.committed = tuple(records)
            self._docs = {i.name: _pointer_document(
                i.name, i.episode_index, i.runtime.timestamp if i.runtime else None,
                i.record.val_score) for i in whole}
            self.best = best_of(records, self.mode)
            self._best_named = {self.best.name} if self.best is not None else set()
            if not guarded(b.store, b.root, "opening", self._best_is_current):
                self._move_best()
            repair_latest(b, whole, self._docs)
        except BaseException:
            b.close()
            raise
        return records

    def close(self) -> None:
        """Release the directory lock (logging removal failures no commit reported)."""
        for msg in self._reclaim_errors:
            log.warning("%s; the next writer to open the directory removes them", msg)
        self._reclaim_errors = []
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
        self._next_prefix = None  # set again once this commit stands
        name = layout.checkpoint_name(meta.episode_index)
        mem_name = layout.memory_file_name(meta.episode_index)
        streams = [("memory", mem_name, mem), *(
            (f"log:{n}", layout.log_file_name(n), cap) for n, cap in snap.logs.items())]
        whole = [WholeFile(layout.AGENT_JSON, meta.agent_json),
                 *(WholeFile(it.file, it.value.data if it.sent else None, it.version)
                   for it in snap.state.values()),
                 *(WholeFile(n, data) for n, data in meta.extra_files.items())]
        try:
            plan, tokens, runtime, latest_json, path, (serialize_s, prepare_s) = self._write(
                snap, name, mem_name, streams, whole)
        except StorageError as exc:
            # Space that deletions of earlier commits are still freeing in the
            # background is space this commit may count on: wait for it, then retry.
            if not _out_of_space(exc):
                raise
            freed, failed = b.settle(wait=True)
            self._reclaim_errors += failed
            if not freed:
                raise
            plan, tokens, runtime, latest_json, path, (serialize_s, prepare_s) = self._write(
                snap, name, mem_name, streams, whole)
        self._carries.remember(plan, tokens)
        # Copied ahead for the next commit where it may extend this file: not for a
        # memory that did not grow (then linked, likely again next time).
        nxt = tokens.get(mem_name)
        self._next_prefix = nxt if nxt and nxt.nbytes >= _PREPARE_MIN_BYTES and \
            plan.memory.new_bytes else None
        record = CheckpointRecord(name, meta.episode_index, meta.val_score)
        # Known before the pointer moves: if that fails, retention still sees it later.
        self.known[name] = record
        self._docs[name] = latest_json
        self.committed = tuple(self.known.values())
        try:
            b.replace_pointer(name, latest_json)
        except BaseException:
            self._rank_all = True
            raise
        best_error = self._update_best(record)
        deleted, retention_error = self._retain(name)
        extendable, logs_ok, kept = self._hints(snap, tokens)
        total = time.perf_counter() - t0
        carried = [s.carry for s in plan.streams]
        return CommitReport(
            name=name, path=path, episode_index=meta.episode_index, val_score=meta.val_score,
            bytes_written=plan.bytes_written + len(runtime),
            bytes_serialized=sum(s.new_bytes for s in plan.streams),
            entries_serialized=sum(s.cap.entries - (s.carry.entries if s.carry else 0)
                                   for s in plan.streams),
            incremental=carried[0] is not None, serialize_seconds=serialize_s,
            write_seconds=total - serialize_s, deleted=tuple(deleted),
            retention_error=retention_error, log_id=mem.log_id, nbytes=mem.nbytes,
            extendable=extendable, best_error=best_error, bytes_reused=plan.bytes_reused,
            files_linked=plan.files_linked, logs_extendable=logs_ok, state_kept=kept,
            prepare_seconds=prepare_s, preparing=self.can_prepare,
        )

    @property
    def can_prepare(self) -> bool:
        """Whether :meth:`prepare` has a file to copy ahead, and it may help."""
        return self._next_prefix is not None and self.backend.prepares

    def prepare(self, stop: Callable[[], bool]) -> None:
        """Copy the memory file committed last ahead, for the next commit to extend
        (:meth:`Backend.prepare_prefix`); asks ``stop`` as it goes. Never raises."""
        token, self._next_prefix = self._next_prefix, None
        try:
            if token is not None:
                self.backend.prepare_prefix(token, stop)
        except Exception as exc:  # only ever an optimization: the commit copies itself
            log.debug("copying the memory prefix ahead failed: %s", exc)

    def _write(self, snap: CapturedSnapshot, name: str, mem_name: str,
               streams: list[tuple[str, str, MemoryCapture]], whole: list[WholeFile],
               ) -> tuple[Plan, dict[str, ReuseToken], bytes, bytes, str, tuple[float, float]]:
        """The checkpoint's files and marker, finalized: it exists when this returns (and
        the seconds spent serializing, and copying ahead the prefix it extended)."""
        meta, b = snap.meta, self.backend
        plan = self._carries.plan(b, streams, whole)
        pending: PendingCheckpoint | None = None
        try:
            pending = b.begin(name)
            plan.start_hashing()
            try:
                tokens = pending.write([plan.first])
                b._step("memory_written")
                tokens.update(pending.write(plan.rest))
            except BaseException:
                plan.abandon_hashing()
                raise
            plan.finish_hashing()
            b._step("files_written")
            s0 = time.perf_counter()
            runtime, latest_json = commit_documents(meta, name, mem_name, snap.memory.entries,
                                                    plan.listing())
            serialize_s = time.perf_counter() - s0
            path = pending.finalize(runtime, latest=latest_json)
        except BaseException as exc:
            if pending is not None:
                pending.discard()
            if isinstance(exc, OSError):
                # What the backend did not word itself (a fault between its steps).
                where = b.store.join(b.root, name)
                raise b.store.error(exc, "writing checkpoint", where) from exc
            raise
        return plan, tokens, runtime, latest_json, path, (serialize_s, pending.prepared_seconds)

    def _hints(self, snap: CapturedSnapshot, tokens: Mapping[str, ReuseToken]
               ) -> tuple[bool, dict[str, tuple[str, int]], dict[str, str]]:
        """What the next hand-over may leave out: only hints (the commit is done), so a
        failure to tell is no error: that commit sends more."""
        b = self.backend
        try:
            extendable = b.can_reuse(tokens[layout.memory_file_name(snap.episode_index)])
            logs = {n: (cap.log_id, cap.nbytes) for n, cap in snap.logs.items()
                    if b.can_reuse(tokens[layout.log_file_name(n)])}
            items = list(snap.state.values())
            kept = {k: it.version for k, it in snap.state.items()} \
                if items and b.can_reuse(tokens[items[0].file], whole=True) else {}
        except Exception:
            return False, {}, {}
        return extendable, logs, kept

    # -- the best pointer -------------------------------------------------------------

    def _best_is_current(self) -> bool:
        """True if ``best`` and ``best.json`` on disk name exactly :attr:`best`, as it is."""
        store, root, best = self.backend.store, self.backend.root, self.best
        want = best.name if best is not None else None
        # Object storage has no symlinks: best.json alone is the pointer there.
        link = store.readlink(store.join(root, layout.BEST_LINK))
        if link != (None if store.marker_commits else want):
            return False
        try:
            doc = store.read(store.join(root, layout.BEST_JSON), limit=MAX_DOCUMENT_BYTES)
        except FileNotFoundError:
            return best is None
        except OSError:
            return False  # not a readable file: rewritten (or the rewrite says why)
        if best is None:
            return False
        try:
            return LatestPointer.model_validate_json(doc) == \
                LatestPointer.model_validate_json(self._docs[best.name])
        except ValidationError:
            return False

    def _move_best(self) -> None:
        if self.best is None:
            self.backend.remove_pointer(layout.BEST_LINK)
        else:
            self.backend.replace_pointer(self.best.name, self._docs[self.best.name],
                                         pointer=layout.BEST_LINK)

    def _update_best(self, new: CheckpointRecord) -> str | None:
        """Move ``best`` if ``new`` beats it or replaced it; why that failed, if it did."""
        prev = self.best
        if self._rank_all or (prev is not None and prev.name == new.name):
            # The best itself was re-committed (maybe with another score): rank them all.
            self._rank_all = False
            best = best_of(self.known.values(), self.mode)
        else:
            best = best_of([new] if prev is None else [prev, new], self.mode)
        self.best = best
        want = {best.name} if best is not None else set()
        if self._best_named == want and (best is None or best.name != new.name):
            return None
        try:
            self._move_best()
        except CheckpointError as exc:
            was = ", ".join(sorted(self._best_named)) or "nothing"
            self._best_named |= want
            msg = (f"{new.name} is committed, but best could not be moved to "
                   f"{best.name if best is not None else 'nothing'} (it still names {was}; "
                   f"the next checkpoint tries again): {exc}")
            # Crosses the pipe from the writer process, where text must be UTF-8.
            return msg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        self._best_named = want
        return None

    def _retain(self, newest: str) -> tuple[list[str], str | None]:
        # What the best pointer names (or may still name) stays, whatever the policy.
        doomed = select_for_deletion(
            list(self.known.values()), self.policy,
            protected=self.protect | {newest} | self._best_named,
        )
        deleted: list[str] = []
        # The previous pass's removals went on beside this commit: done by now as a rule,
        # waited for if not (at most one pass of them in flight); failures reported here.
        errors = [*self._reclaim_errors, *self.backend.settle(wait=True)[1]]
        self._reclaim_errors = []
        for name in doomed:
            try:
                self.backend.delete(name)
            except CheckpointError as exc:
                # The new checkpoint is durable; this one stays known and is tried again
                # on the next pass. The others are still deleted now.
                errors.append(str(exc))
                continue
            del self.known[name]
            self._docs.pop(name, None)
            deleted.append(name)
        self.committed = tuple(self.known.values())
        return deleted, "; ".join(errors) if errors else None
