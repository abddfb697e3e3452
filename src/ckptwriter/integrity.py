"""Is a checkpoint whole: the full check and the cheap one, over the read primitives.

- The full check (:func:`read_checkpoint`, :func:`is_whole`) reads ``runtime.json`` and
  each file it lists exactly once and checks the size and sha256 of the bytes it read;
  loading builds the checkpoint from those same bytes, so nothing is read twice.
- The cheap check (:func:`scan`, for listings and the writer's start-up) parses
  ``runtime.json`` and compares every file's size with one listing; no sha256.

Part of the reader: :mod:`ckptwriter.reader` resolves ``latest`` and what users pass on
top of it. Nothing a manifest names is reached through a symlink or outside its checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pydantic import ValidationError

from . import layout
from .agent_state import AgentState
from .checkpoint_files import (
    Gone,
    current_marker,
    file_error,
    marker_commits,
    opened,
    opened_with_marker,
    read_files,
    read_marker,
    size_problem,
)
from .checkpoint_sections import load_log, restore_sections
from .discovery import name_of
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    MemoryTypeMismatchError,
    UnsafePathError,
)
from .manifest import AgentManifest, RuntimeManifest
from .memory import MemoryLog
from .retention import CheckpointRecord
from .storage.base import ReadStore

__all__ = [
    "CheckpointInfo",
    "Contents",
    "Gone",
    "LoadedCheckpoint",
    "Seen",
    "current_marker",
    "file_error",
    "is_whole",
    "loaded",
    "read_checkpoint",
    "scan",
    "scan_with_markers",
    "verified",
]

# runtime.json markers read at once when listing (object stores: one request each).
_MARKER_THREADS = 8
# Checks of a checkpoint that looked damaged in a listing: another only when its
# runtime.json changed during the last (a re-commit), so this only stops one lapped forever.
_RECHECKS = 1000


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint directory as found on disk (cheap checks only: sizes, not sha256)."""

    name: str
    path: Path
    episode_index: int
    complete: bool
    runtime: RuntimeManifest | None = None
    problem: str | None = None
    size_bytes: int = 0

    @property
    def record(self) -> CheckpointRecord:
        """The retention view of this checkpoint."""
        score = self.runtime.val_score if self.runtime else None
        return CheckpointRecord(self.name, self.episode_index, score)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A verified checkpoint, read back."""

    path: Path
    runtime: RuntimeManifest
    agent: AgentManifest
    memory: MemoryLog
    extra_files: dict[str, bytes] = field(default_factory=dict)
    # Named logs (Snapshot.logs) and the agent state (Snapshot.state), as saved.
    logs: dict[str, MemoryLog] = field(default_factory=dict)
    state: AgentState = field(default_factory=AgentState)


@dataclass
class Seen:
    """The runtime.json bytes one read of a checkpoint started from (or will start from)."""

    marker: bytes | None = None


def _runtime(shown: str, dir_name: str, data: bytes) -> RuntimeManifest:
    """Validate a checkpoint's runtime.json."""
    try:
        rt = RuntimeManifest.model_validate_json(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "document"
        msg = f"invalid ({where}: {err['msg']})"
        if err["loc"] and err["loc"][0] in {"memory_snapshot_path", "files"}:
            raise UnsafePathError(shown, layout.RUNTIME_JSON, msg) from None
        raise CheckpointCorruptError(shown, layout.RUNTIME_JSON, msg) from None
    if rt.memory_snapshot_path not in rt.files:
        raise CheckpointCorruptError(
            shown, layout.RUNTIME_JSON, f"lists no checksum for {rt.memory_snapshot_path}"
        )
    if layout.AGENT_JSON not in rt.files:
        raise CheckpointCorruptError(shown, layout.RUNTIME_JSON, "lists no checksum for agent.json")
    named = layout.parse_checkpoint_name(dir_name)
    if named is not None and named != rt.episode_index:
        # runtime.json carries no checksum of its own: an edited episode_index would
        # silently restart training from the wrong episode ("Training restarts from 0").
        raise CheckpointCorruptError(
            shown, layout.RUNTIME_JSON,
            f"episode_index is {rt.episode_index} but the directory is {dir_name}",
        )
    return rt


@dataclass(frozen=True)
class Contents:
    """What one full check read: the manifest and (when kept) each file's bytes."""

    runtime: RuntimeManifest
    files: dict[str, bytes]


def read_checkpoint(store: ReadStore, ckpt: str, seen: Seen, *, keep: bool) -> Contents:
    """Read runtime.json and every file it lists once; check each file's size and sha256.

    Raises:
        Gone: no checkpoint there.
        CheckpointCorruptError: a file is missing, damaged or unsafe.
    """
    shown = store.url(ckpt)
    with opened_with_marker(store, ckpt, shown, seen.marker) as (d, seen.marker):
        rt = _runtime(shown, name_of(ckpt), seen.marker)
        got = read_files(store, d, ckpt, rt.files, shown)
    kept: dict[str, bytes] = {}
    for name, data in got:
        digest = rt.files[name]
        if len(data) != digest.bytes:
            raise CheckpointCorruptError(shown, name, size_problem(len(data), digest))
        if hashlib.sha256(data).hexdigest() != digest.sha256:
            raise CheckpointCorruptError(shown, name, "sha256 does not match runtime.json")
        if keep:
            kept[name] = data
    return Contents(rt, {name: kept[name] for name in rt.files} if keep else {})


def verified(store: ReadStore, ckpt: str, seen: Seen) -> str:
    """``ckpt``, once fully checked (see :func:`read_checkpoint`)."""
    read_checkpoint(store, ckpt, seen, keep=False)
    return ckpt


def loaded(
    store: ReadStore, expected_memory_type: str | None, ckpt: str, seen: Seen,
    *, entry_types: tuple[type, ...] = (), raw: bool = False,
    state_types: tuple[type, ...] = (),
) -> LoadedCheckpoint:
    """The checkpoint at ``ckpt``, built from the bytes its full check read.

    Raises:
        Gone, CheckpointCorruptError, MemoryTypeMismatchError (UnknownEntryTypeError,
        UnknownStateTypeError, ClassMismatchError: a class changed since; no fallback).
    """
    got = read_checkpoint(store, ckpt, seen, keep=True)
    shown, rt, blobs = store.url(ckpt), got.runtime, dict(got.files)
    try:
        agent = AgentManifest.model_validate_json(blobs.pop(layout.AGENT_JSON))
    except ValidationError as exc:
        problem = f"invalid ({exc.errors()[0]['msg']})"
        raise CheckpointCorruptError(shown, layout.AGENT_JSON, problem) from None
    if expected_memory_type is not None and agent.memory_type != expected_memory_type:
        raise MemoryTypeMismatchError(shown, agent.memory_type, expected_memory_type)
    memory_data = blobs.pop(rt.memory_snapshot_path, None)
    if memory_data is None:  # it names agent.json, which was taken above
        raise CheckpointCorruptError(shown, layout.RUNTIME_JSON, "memory_snapshot_path "
                                     f"names {rt.memory_snapshot_path}, not a memory file")
    memory = load_log(agent, rt.memory_snapshot_path, memory_data,
                      memory_type=agent.memory_type, entry_types=entry_types, raw=raw,
                      shown=shown, section="Memory")
    logs, state = restore_sections(agent, blobs, shown, entry_types=entry_types,
                                   state_types=state_types, raw=raw)
    return LoadedCheckpoint(store.as_path(ckpt), rt, agent, memory, blobs, logs, state)


def is_whole(store: ReadStore, path: str) -> bool:
    """True if ``path`` is a real directory holding a complete, intact checkpoint.

    A full verification (every sha256) that answers instead of raising: the local backend
    asks it before putting back a checkpoint a crash left aside.
    """
    entry = store.stat(path)
    if entry is None or entry.kind != "dir":
        return False
    try:
        read_checkpoint(store, path, Seen(), keep=False)
    except (CheckpointError, Gone):
        return False
    return True


# -- a checkpoints directory: the cheap listing ----------------------------------------


def _quick_check(
    store: ReadStore, ckpt: str, marker: bytes, sizes: dict[str, int]
) -> tuple[RuntimeManifest, int]:
    """runtime.json valid and every file present, regular, of the recorded size."""
    shown, name = store.url(ckpt), name_of(ckpt)
    rt = _runtime(shown, name, marker)
    total = 0
    for fname, digest in rt.files.items():
        size = sizes.get(f"{name}/{fname}")
        if size is None:
            with opened(store, ckpt) as d:  # never stat'ed through a swapped-in symlink
                entry = d.stat(fname)
            if entry is None:
                raise CheckpointCorruptError(shown, fname, "missing")
            if entry.kind == "link":
                raise UnsafePathError(shown, fname, "is a symlink; refusing to follow it")
            if entry.kind != "file":
                raise CheckpointCorruptError(shown, fname, "is not a regular file")
            size = entry.size
        if size != digest.bytes:
            raise CheckpointCorruptError(shown, fname, size_problem(size, digest))
        total += size
    return rt, total


def _rechecked(store: ReadStore, ckpt: str, exc: CheckpointCorruptError
               ) -> tuple[RuntimeManifest, int, bytes]:
    """The quick check of a checkpoint that looked damaged, again from its own sizes.

    A re-commit (``replace=True``) between a listing's one walk of sizes and its marker
    reads mixes two copies (it looks truncated). Sizes read between two equal reads of
    runtime.json are of that copy. Raises the damage that stays (``exc`` if it never
    stopped changing), or Gone.
    """
    shown, name = store.url(ckpt), name_of(ckpt)
    for _ in range(_RECHECKS):
        with opened(store, ckpt) as d:
            marker = read_marker(store, d, ckpt, shown)
        sizes = {f"{name}/{f}": n for f, n in store.sizes(ckpt).items()}
        with opened(store, ckpt) as d:
            again = read_marker(store, d, ckpt, shown)
        if again == marker:
            return (*_quick_check(store, ckpt, marker, sizes), marker)
    raise exc


def _read_markers(store: ReadStore, ckpts: list[str]) -> dict[str, bytes | None]:
    # None: read again, for the exact problem, by read_marker.
    if len(ckpts) <= 2:
        return {c: current_marker(store, c) for c in ckpts}
    with concurrent.futures.ThreadPoolExecutor(_MARKER_THREADS, "ckptwriter-scan") as pool:
        got = pool.map(partial(current_marker, store), ckpts)
        return dict(zip(ckpts, got, strict=True))


def scan_with_markers(store: ReadStore, root: str) -> list[tuple[CheckpointInfo, bytes | None]]:
    """:func:`scan`, each complete checkpoint with the runtime.json bytes it was read from
    (so a reader that goes on to load one does not read its runtime.json again).

    A listing of a live run that every checkpoint it named left while it was read (a
    slow reader, a writer retiring one per commit) is taken again: a directory with
    checkpoints is never listed as having none.
    """
    for _ in range(_RECHECKS):
        out, vanished = _scan_once(store, root)
        if not vanished or any(info.complete for info, _ in out):
            break
    return out


def _scan_once(store: ReadStore, root: str
               ) -> tuple[list[tuple[CheckpointInfo, bytes | None]], bool]:
    eps = sorted(
        (ep, name) for name in store.listdir(root) or []
        if (ep := layout.parse_checkpoint_name(name)) is not None
    )
    if not eps:
        return [], False
    sizes = store.sizes(root)
    listed = [store.join(root, n) for _, n in eps if f"{n}/{layout.RUNTIME_JSON}" in sizes]
    markers = _read_markers(store, listed)
    out: list[tuple[CheckpointInfo, bytes | None]] = []
    vanished = False
    for ep, name in eps:
        ckpt = store.join(root, name)
        path = store.as_path(ckpt)
        marker = markers.get(ckpt)
        if marker is None:
            if marker_commits(store) and ckpt not in markers:
                continue  # uncommitted: not a checkpoint yet (or any more)
            entry = store.stat(ckpt)
            if entry is None:
                vanished = True  # deleted since the listing
                continue
            if entry.kind != "dir":
                out.append((CheckpointInfo(name, path, ep, False, problem="not a directory"), None))
                continue
        try:
            if marker is None:
                with opened(store, ckpt) as d:
                    marker = read_marker(store, d, ckpt, store.url(ckpt))
            try:
                rt, size = _quick_check(store, ckpt, marker, sizes)
            except CheckpointCorruptError as first:
                rt, size, marker = _rechecked(store, ckpt, first)
        except Gone:
            vanished = True
            continue
        except CheckpointCorruptError as exc:
            problem = f"{exc.file}: {exc.problem}"
            out.append((CheckpointInfo(name, path, ep, False, problem=problem), None))
            continue
        out.append((CheckpointInfo(name, path, ep, True, runtime=rt, size_bytes=size), marker))
    return out, vanished


def scan(store: ReadStore, root: str) -> list[CheckpointInfo]:
    """Every checkpoint of a checkpoints directory, oldest first, with the cheap checks.

    runtime.json parsed and every file's size compared with one listing; no sha256. On
    object storage a prefix without runtime.json (not committed) is left out.
    """
    return [info for info, _ in scan_with_markers(store, root)]

