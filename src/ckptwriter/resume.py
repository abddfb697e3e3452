"""Find, verify and load checkpoints: what ``resume_from`` and the inspection commands use.

A reader trusts only a directory whose ``runtime.json`` is valid and whose files match
their recorded sizes and sha256. ``latest`` (symlink or ``latest.json``) is followed only
to a plain name inside the same checkpoints directory; when it is missing or broken the
newest valid checkpoint is used instead, with a :class:`CheckpointFallbackWarning`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from . import layout
from .errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    MemoryTypeMismatchError,
    UnsafePathError,
)
from .manifest import AgentManifest, LatestPointer, RuntimeManifest, check_plain_name
from .memory import MemoryLog
from .retention import CheckpointRecord

__all__ = [
    "CheckpointFallbackWarning",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "scan_checkpoints",
    "verify_checkpoint",
]

_READ_CHUNK = 4 * 1024 * 1024
# How often a reader re-follows a pointer that moved under it before giving up on it.
_POINTER_RETRIES = 5


class CheckpointFallbackWarning(UserWarning):
    """``latest`` was missing or broken; an older valid checkpoint is used instead."""


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


def _read_regular(path: Path, checkpoint: Path, name: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointCorruptError(checkpoint, name, "missing") from None
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePathError(checkpoint, name, "is a symlink; refusing to follow it") from None
        raise CheckpointCorruptError(checkpoint, name, f"unreadable ({exc.strerror})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointCorruptError(checkpoint, name, "is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _parse_runtime(ckpt: Path) -> RuntimeManifest:
    data = _read_regular(ckpt / layout.RUNTIME_JSON, ckpt, layout.RUNTIME_JSON)
    return runtime_from_bytes(ckpt, data)


def runtime_from_bytes(ckpt: Path, data: bytes) -> RuntimeManifest:
    """Validate a checkpoint's runtime.json (shared by every backend's reader)."""
    try:
        rt = RuntimeManifest.model_validate_json(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "document"
        msg = f"invalid ({where}: {err['msg']})"
        if err["loc"] and err["loc"][0] in {"memory_snapshot_path", "files"}:
            raise UnsafePathError(ckpt, layout.RUNTIME_JSON, msg) from None
        raise CheckpointCorruptError(ckpt, layout.RUNTIME_JSON, msg) from None
    if rt.memory_snapshot_path not in rt.files:
        raise CheckpointCorruptError(
            ckpt, layout.RUNTIME_JSON, f"lists no checksum for {rt.memory_snapshot_path}"
        )
    if layout.AGENT_JSON not in rt.files:
        raise CheckpointCorruptError(ckpt, layout.RUNTIME_JSON, "lists no checksum for agent.json")
    named = layout.parse_checkpoint_name(ckpt.name)
    if named is not None and named != rt.episode_index:
        # runtime.json carries no checksum of its own: an edited episode_index would
        # silently restart training from the wrong episode ("Training restarts from 0").
        raise CheckpointCorruptError(
            ckpt, layout.RUNTIME_JSON,
            f"episode_index is {rt.episode_index} but the directory is {ckpt.name}",
        )
    return rt


def _quick_check(ckpt: Path) -> tuple[RuntimeManifest, int]:
    """runtime.json valid and every file present, regular, of the recorded size."""
    rt = _parse_runtime(ckpt)
    total = 0
    for name, digest in rt.files.items():
        p = ckpt / name
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise CheckpointCorruptError(ckpt, name, "missing") from None
        except OSError as exc:  # e.g. ENAMETOOLONG from a hostile files{} entry
            raise CheckpointCorruptError(ckpt, name, f"unreadable ({exc.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(ckpt, name, "is a symlink; refusing to follow it")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointCorruptError(ckpt, name, "is not a regular file")
        if st.st_size != digest.bytes:
            raise CheckpointCorruptError(
                ckpt, name, f"size {st.st_size} bytes, expected {digest.bytes} (truncated?)"
            )
        total += st.st_size
    return rt, total


def verify_checkpoint(path: str | os.PathLike[str]) -> RuntimeManifest:
    """Check every file of one checkpoint directory against its size and sha256.

    Returns:
        the validated runtime manifest.

    Raises:
        CheckpointNotFoundError: the directory does not exist.
        CheckpointCorruptError: a file is missing, damaged or unsafe (the file is named).
    """
    if "://" in os.fspath(path):  # fsspec URL (s3://...): storage/remote_read.py
        from .storage import remote_read

        return remote_read.verify_checkpoint(os.fspath(path))
    ckpt = Path(path)
    # os.path.isdir, not Path.is_dir: a name too long for the filesystem (from a pointer
    # or a typo) must be "not found", not an OSError traceback.
    if not os.path.isdir(ckpt):
        raise CheckpointNotFoundError(ckpt, _nearby(ckpt))
    rt, _ = _quick_check(ckpt)
    for name, digest in rt.files.items():
        if _sha256_file(ckpt / name, ckpt, name) != digest.sha256:
            raise CheckpointCorruptError(ckpt, name, "sha256 does not match runtime.json")
    return rt


def _sha256_file(path: Path, ckpt: Path, name: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointCorruptError(ckpt, name, f"unreadable ({exc.strerror})") from exc
    sha = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def scan_checkpoints(root: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every ``ep_*`` directory under a checkpoints dir, oldest first, with quick checks."""
    if "://" in os.fspath(root):
        from .storage import remote_read

        return remote_read.list_checkpoints(os.fspath(root))
    base = Path(root)
    out: list[CheckpointInfo] = []
    try:
        names = os.listdir(base)
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in names:
        ep = layout.parse_checkpoint_name(name)
        if ep is None:
            continue
        p = base / name
        if p.is_symlink() or not p.is_dir():
            out.append(CheckpointInfo(name, p, ep, False, problem="not a directory"))
            continue
        try:
            rt, size = _quick_check(p)
        except CheckpointCorruptError as exc:
            out.append(CheckpointInfo(name, p, ep, False, problem=f"{exc.file}: {exc.problem}"))
            continue
        out.append(CheckpointInfo(name, p, ep, True, runtime=rt, size_bytes=size))
    out.sort(key=lambda i: i.episode_index)
    return out


def list_checkpoints(checkpoints_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Checkpoints of a checkpoints directory, oldest first (see :class:`CheckpointInfo`)."""
    return scan_checkpoints(checkpoints_dir)


def _is_checkpoints_dir(p: Path) -> bool:
    if (p / layout.LATEST_JSON).exists() or os.path.lexists(p / layout.LATEST_LINK):
        return True
    try:
        return any(layout.parse_checkpoint_name(n) is not None for n in os.listdir(p))
    except OSError:
        return False


def _run_order(name: str) -> tuple[str, int]:
    # Runs started in the same second are <stamp>, <stamp>_1, ... <stamp>_10: by name,
    # "_10" would sort before "_2" and resume would pick an older run as the newest.
    return name[:15], int(name[16:] or 0)


def _run_dirs(p: Path) -> list[Path]:
    try:
        subs = [s for s in os.listdir(p) if layout.RUN_DIR_RE.match(s)]
    except OSError:
        return []
    return [p / s for s in sorted(subs, key=_run_order) if (p / s / "checkpoints").is_dir()]


def _pointer_target(root: Path) -> tuple[str | None, str | None]:
    """(checkpoint name named by latest, or None; why it could not be used)."""
    link = root / layout.LATEST_LINK
    if os.path.islink(link):
        target = os.readlink(link)
        try:
            check_plain_name(target)
        except ValueError:
            raise UnsafePathError(
                root, layout.LATEST_LINK,
                f"points at {target!r}, outside the checkpoints directory; refusing to follow it",
            ) from None
        return target, None
    jpath = root / layout.LATEST_JSON
    if jpath.exists():
        try:
            ptr = LatestPointer.model_validate_json(_read_regular(jpath, root, layout.LATEST_JSON))
        except ValidationError as exc:
            err = exc.errors()[0]
            if err["loc"] and err["loc"][0] == "checkpoint":
                raise UnsafePathError(
                    root, layout.LATEST_JSON,
                    "names a checkpoint outside the checkpoints directory; refusing to follow it",
                ) from None
            return None, f"{layout.LATEST_JSON} is invalid"
        return ptr.checkpoint, None
    return None, "latest is missing"


def _resolve_latest(root: Path, shown: str) -> Path:
    why: str | None = None
    for _ in range(_POINTER_RETRIES):
        target, why = _pointer_target(root)
        if target is None:
            break
        cand = root / target
        if os.path.islink(cand):
            # A checkpoint is a real directory of this checkpoints dir; a symlinked ep_*
            # would let a pointer lead anywhere on disk.
            raise UnsafePathError(
                root, target, f"is a symlink to {os.readlink(cand)}; refusing to follow it"
            )
        try:
            verify_checkpoint(cand)
            return cand
        except CheckpointNotFoundError:
            why = f"latest points at {target}, which does not exist"
        except CheckpointCorruptError as exc:
            why = f"latest points at {target}, which is broken ({exc.file}: {exc.problem})"
        # A live writer may have moved latest and retired the old target while we read it:
        # that is a race, not damage, so follow the pointer again before falling back.
        if _pointer_target(root)[0] == target:
            break
    for info in reversed(scan_checkpoints(root)):
        if not info.complete:
            continue
        try:
            verify_checkpoint(info.path)
        except CheckpointCorruptError:
            continue
        warnings.warn(
            f"{why}; falling back to the newest valid checkpoint {info.path}",
            CheckpointFallbackWarning,
            stacklevel=3,
        )
        return info.path
    raise CheckpointNotFoundError(
        shown, _nearby(root), hint=f"No valid checkpoint in {root} ({why})."
    )


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Turn what a user may pass as ``resume_from`` into one verified checkpoint directory.

    Accepts a checkpoint directory, the ``latest`` symlink, ``latest.json``, a
    ``checkpoints/`` directory (its latest), a run directory, or ``outputs/<run_name>``
    (its newest run).

    Raises:
        CheckpointNotFoundError: nothing there; the message lists checkpoints nearby.
        CheckpointCorruptError: a named checkpoint is broken (the file is named).
    """
    if "://" in os.fspath(path):
        from .storage import remote_read

        return remote_read.resolve_checkpoint(os.fspath(path))
    p = Path(path)
    if p.name == layout.LATEST_LINK or p.name == layout.LATEST_JSON:
        if os.path.isdir(p.parent) and (os.path.lexists(p) or _is_checkpoints_dir(p.parent)):
            return _resolve_latest(p.parent, str(path))
    if os.path.isdir(p):
        if (os.path.exists(p / layout.RUNTIME_JSON)
                or layout.parse_checkpoint_name(p.name) is not None):
            verify_checkpoint(p)
            return p
        if _is_checkpoints_dir(p):
            return _resolve_latest(p, str(path))
        if (p / "checkpoints").is_dir():
            return _resolve_latest(p / "checkpoints", str(path))
        for run in reversed(_run_dirs(p)):
            if any(i.complete for i in scan_checkpoints(run / "checkpoints")):
                return _resolve_latest(run / "checkpoints", str(path))
    if os.path.isfile(p) and os.path.isfile(p.parent / layout.RUNTIME_JSON):
        raise CheckpointNotFoundError(
            str(path), [str(p.parent)],
            hint=f"That is a file inside checkpoint {p.parent.name}: "
                 f"pass the checkpoint directory {p.parent} instead.",
        )
    raise CheckpointNotFoundError(str(path), _nearby(p))


def load_checkpoint(
    path: str | os.PathLike[str], *, expected_memory_type: str | None = None
) -> LoadedCheckpoint:
    """Resolve, verify and read a checkpoint.

    Args:
        path: anything :func:`resolve_checkpoint` accepts.
        expected_memory_type: if given, the checkpoint's memory type must match.

    Raises:
        CheckpointNotFoundError, CheckpointCorruptError, MemoryTypeMismatchError.
    """
    if "://" in os.fspath(path):
        from .storage import remote_read

        return remote_read.load_checkpoint(os.fspath(path), expected_memory_type)
    p = Path(path)
    if (
        p.name not in (layout.LATEST_LINK, layout.LATEST_JSON)
        and not os.path.islink(p)
        and os.path.isdir(p)
        and (os.path.exists(p / layout.RUNTIME_JSON)
             or layout.parse_checkpoint_name(p.name) is not None)
    ):
        # A named checkpoint: reading checks every file's sha256 once; no separate verify.
        return _load_dir(p, expected_memory_type)
    for attempt in range(_POINTER_RETRIES):
        ckpt = resolve_checkpoint(path)
        try:
            return _load_dir(ckpt, expected_memory_type)
        except CheckpointCorruptError:
            # Resolved through a pointer that has moved since: a writer retired the old
            # checkpoint while we read it. Read the new one instead.
            if attempt + 1 < _POINTER_RETRIES and resolve_checkpoint(path) != ckpt:
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _load_dir(ckpt: Path, expected_memory_type: str | None) -> LoadedCheckpoint:
    if not ckpt.is_dir():
        raise CheckpointNotFoundError(ckpt, _nearby(ckpt))
    # Sizes and symlinks first (cheap, and the most precise message), then one read each.
    rt, _ = _quick_check(ckpt)
    raw = {name: _read_regular(ckpt / name, ckpt, name) for name in rt.files}
    return checkpoint_from_files(ckpt, rt, raw, expected_memory_type)


def checkpoint_from_files(
    ckpt: Path, rt: RuntimeManifest, raw: dict[str, bytes], expected_memory_type: str | None
) -> LoadedCheckpoint:
    """Check each file's bytes against runtime.json and build the loaded checkpoint.

    Shared by every backend: ``raw`` maps each name in ``rt.files`` to its bytes.
    """
    blobs: dict[str, bytes] = {}
    for name, digest in rt.files.items():
        data = raw[name]
        if len(data) != digest.bytes or hashlib.sha256(data).hexdigest() != digest.sha256:
            raise CheckpointCorruptError(ckpt, name, "sha256 does not match runtime.json")
        blobs[name] = data
    try:
        agent = AgentManifest.model_validate_json(blobs.pop(layout.AGENT_JSON))
    except ValidationError as exc:
        problem = f"invalid ({exc.errors()[0]['msg']})"
        raise CheckpointCorruptError(ckpt, layout.AGENT_JSON, problem) from None
    if expected_memory_type is not None and agent.memory_type != expected_memory_type:
        raise MemoryTypeMismatchError(ckpt, agent.memory_type, expected_memory_type)
    mem_bytes = blobs.pop(rt.memory_snapshot_path)
    try:
        memory = MemoryLog.from_jsonl(mem_bytes, memory_type=agent.memory_type)
    except ValueError as exc:
        raise CheckpointCorruptError(ckpt, rt.memory_snapshot_path, str(exc)) from None
    return LoadedCheckpoint(path=ckpt, runtime=rt, agent=agent, memory=memory, extra_files=blobs)


def _nearby(p: Path, limit: int = 10) -> list[str]:
    """Checkpoints close to a path that does not resolve, newest first, for the error."""
    anc = p
    while not os.path.isdir(anc) and anc != anc.parent:
        anc = anc.parent
    found: list[tuple[float, str]] = []
    # An existing but empty directory (a run that never saved) has its checkpoints in
    # siblings: look up to two levels higher, never from the filesystem root.
    for _ in range(3):
        if anc == anc.parent:
            break
        for pattern in ("ep_*", "*/ep_*", "*/*/ep_*", "*/*/*/ep_*"):
            try:
                for c in anc.glob(pattern):
                    if c.is_dir() and (c / layout.RUNTIME_JSON).exists():
                        found.append((c.stat().st_mtime, str(c)))
            except OSError:
                continue
            if found:
                break
        if found:
            break
        anc = anc.parent
    found.sort(reverse=True)
    return [s for _, s in found[:limit]]
