"""Find, verify and load checkpoints: what ``resume_from`` and the inspection commands use.

Written once over the read primitives of every backend (local disk, object storage). A
reader trusts only a checkpoint whose ``runtime.json`` is valid and whose files match
their recorded sizes and sha256, checked on the very bytes it read: each file is read
once (:mod:`ckptwriter.integrity`). ``latest`` (the symlink, else ``latest.json``) is
followed only to a plain name inside the same checkpoints directory; when it is missing
or broken the newest valid checkpoint is used, with a :class:`CheckpointFallbackWarning`
(none valid: the error names every broken one).

Readers of a live run:
    When what was resolved through ``latest`` (or a checkpoints or run directory) vanishes
    or changes under the reader (retention deleted it, a re-commit replaced it, the
    pointer moved), the reader resolves again, as long as it keeps moving (each retry
    follows a commit made meanwhile; at most :data:`_ATTEMPTS`), on every backend. Only
    a pointer that stays on a broken checkpoint falls back (and warns).

Error handling:
    :class:`~ckptwriter.CheckpointNotFoundError` (nothing there; checkpoints nearby are
    listed), :class:`~ckptwriter.CheckpointCorruptError` (the file and problem named;
    :class:`~ckptwriter.UnsafePathError`: a manifest or pointer tries to leave its
    directory), :class:`~ckptwriter.MemoryTypeMismatchError`, :class:`~ckptwriter.StorageError`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from . import layout
from .discovery import (
    followed,
    guarded,
    holds_checkpoints,
    name_of,
    nearby,
    not_found,
    open_location,
    run_checkpoints,
    timestamped_runs,
)
from .entry_codec import entry_types as entry_types_of
from .errors import CheckpointCorruptError, CheckpointNotFoundError, UnsafePathError, all_broken
from .integrity import (
    CheckpointInfo,
    Gone,
    LoadedCheckpoint,
    Seen,
    current_marker,
    file_error,
    is_whole,
    loaded,
    read_checkpoint,
    scan,
    scan_with_markers,
    verified,
)
from .manifest import MAX_DOCUMENT_BYTES, LatestPointer, RuntimeManifest, check_plain_name
from .storage.base import FileTooLargeError, ReadStore

__all__ = [
    "CheckpointFallbackWarning",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "is_whole",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "scan",
    "verify_checkpoint",
]

_T = TypeVar("_T")
# A retry happens only when the pointer or the checkpoint moved, so each follows a commit
# made during that read: bounded by the writer's progress; the cap stops a reader lapped
# forever. A reader starved on a loaded machine can be lapped often (10 were too few).
_ATTEMPTS = 1000
# Frames from warnings.warn up to the caller of the public function.
_WARN_STACKLEVEL = 6


class CheckpointFallbackWarning(UserWarning):
    """``latest`` was missing or broken; an older valid checkpoint is used instead."""


# -- latest ----------------------------------------------------------------------------

# The pointers of a checkpoints directory: the symlink, and its JSON twin. ``best`` (the
# best val_score, moved by the writer like latest) never falls back to another checkpoint.
_POINTERS = {layout.LATEST_LINK: layout.LATEST_JSON, layout.BEST_LINK: layout.BEST_JSON}


def _pointer(store: ReadStore, root: str, link: str = layout.LATEST_LINK
             ) -> tuple[str | None, str]:
    """(the checkpoint name latest (or ``link``) names, or None; why it could not be used).

    Raises:
        UnsafePathError: latest points outside the checkpoints directory.
        CheckpointCorruptError: latest.json cannot be read.
    """
    shown = store.url(root)
    target = store.readlink(store.join(root, link))
    if target is not None:
        try:
            check_plain_name(target)
        except ValueError:
            raise UnsafePathError(shown, link, f"points at {target!r}, outside the checkpoints "
                                  "directory; refusing to follow it") from None
        return target, ""
    jpath = store.join(root, _POINTERS[link])
    try:
        data = store.read(jpath, limit=MAX_DOCUMENT_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None, f"{link} is missing"
    except FileTooLargeError:
        return None, f"{_POINTERS[link]} is invalid (too large)"
    except OSError as exc:
        raise file_error(store, jpath, shown, _POINTERS[link], exc) from None
    try:
        ptr = LatestPointer.model_validate_json(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["loc"] and err["loc"][0] == "checkpoint":
            raise UnsafePathError(shown, _POINTERS[link], "names a checkpoint outside the "
                                  "checkpoints directory; refusing to follow it") from None
        return None, f"{_POINTERS[link]} is invalid"
    return ptr.checkpoint, ""


def _moved(store: ReadStore, root: str, target: str, seen: Seen, link: str) -> bool:
    """True if latest, or the checkpoint it names, changed since ``seen`` was read."""
    try:
        now, _ = _pointer(store, root, link)
    except CheckpointCorruptError:
        return False
    if now != target:
        return True
    return current_marker(store, store.join(root, target)) != seen.marker


OpenOne = Callable[[str, Seen], _T]


def _through_latest(store: ReadStore, root: str, shown: str, open_one: OpenOne[_T],
                    pointer: str = layout.LATEST_LINK, *, fallback: bool = True) -> _T:
    """Open the checkpoint latest (or ``pointer``) names; again while a live writer moves it.

    Only ``latest`` with ``fallback`` falls back to the newest valid checkpoint when what it
    names stays broken; otherwise what it names is the answer (``best``; ``verify``).
    """
    why = ""
    last: Exception | None = None
    for _ in range(_ATTEMPTS):
        target, why = _pointer(store, root, pointer)
        if target is None:
            break
        cand = store.join(root, target)
        link = store.readlink(cand)
        if link is not None:
            # A checkpoint is a real directory of this checkpoints dir; a symlinked ep_*
            # would let a pointer lead anywhere on disk.
            raise UnsafePathError(
                store.url(root), target, f"is a symlink to {link}; refusing to follow it"
            )
        seen = Seen()
        try:
            return open_one(cand, seen)
        except Gone:
            why = f"{pointer} points at {target}, which does not exist"
            last = CheckpointNotFoundError(store.url(cand))
        except CheckpointCorruptError as exc:
            why = f"{pointer} points at {target}, which is broken ({exc.file}: {exc.problem})"
            last = exc
        if not _moved(store, root, target, seen, pointer):
            break
    else:
        # Still moving after every attempt: what failed is the honest answer, not a
        # fallback warning about a pointer that is not broken.
        assert last is not None
        raise last
    if pointer != layout.LATEST_LINK or not fallback:
        raise last or CheckpointNotFoundError(shown, nearby(store, root), hint=(
            f"No {pointer} in {store.url(root)} ({why})" + (
                "." if pointer == layout.LATEST_LINK else ": the writer keeps one only once "
                "a checkpoint has a val_score; load latest or a checkpoint by name instead.")))
    broken: list[CheckpointCorruptError] = []
    for info, marker in reversed(scan_with_markers(store, root)):
        if not info.complete:  # damaged (sizes): counted among the broken ones
            file, _, problem = (info.problem or "").partition(": ")
            broken += [CheckpointCorruptError(store.url(store.join(root, info.name)), file,
                                              problem)] if problem else []
            continue
        try:
            result = open_one(store.join(root, info.name), Seen(marker))
        except (CheckpointCorruptError, Gone) as exc:
            broken += [exc] if isinstance(exc, CheckpointCorruptError) else []
            continue
        skipped = ", ".join(n for e in broken if (n := name_of(e.checkpoint)) != target)
        warnings.warn(f"{why}; {f'skipped the broken {skipped}; ' if skipped else ''}falling "
                      f"back to the newest valid checkpoint {info.path}",
                      CheckpointFallbackWarning, stacklevel=_WARN_STACKLEVEL)
        return result
    if broken:
        raise all_broken(shown, store.url(root), why, broken)
    raise CheckpointNotFoundError(shown, nearby(store, root),
                                  hint=f"No valid checkpoint in {store.url(root)} ({why}).")


# -- resolving what a user passes -----------------------------------------------------


def _open_named(store: ReadStore, path: str, open_one: OpenOne[_T]) -> _T:
    """Open a checkpoint named directly; read again while it is re-committed under us.

    A re-commit swaps the whole directory in one step, so a read that began on the old
    copy can meet files of the new one: its runtime.json then differs from the bytes the
    read started from, and a fresh read sees one copy whole. Damage that stays is raised.
    """
    for attempt in range(_ATTEMPTS):
        seen = Seen()
        try:
            return open_one(path, seen)
        except CheckpointCorruptError:
            now = current_marker(store, path)
            if attempt == _ATTEMPTS - 1 or seen.marker is None or now == seen.marker:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _named_pointer(store: ReadStore, path: str) -> tuple[str, str] | None:
    """(its checkpoints directory, ``latest`` or ``best``) if ``path`` names a pointer:
    ``latest``, ``latest.json``, ``best`` or ``best.json`` of a checkpoints directory, on
    every backend (object stores have only the JSON twin; the name still means it)."""
    name = name_of(path)
    if name in (*_POINTERS, *_POINTERS.values()):
        parent = followed(store, store.parent(path))  # the user's link to the directory
        children = store.listdir(parent)
        if children is not None and (name in children or holds_checkpoints(children)):
            return parent, name.removesuffix(".json")
    return None


def _resolve(store: ReadStore, path: str, shown: str, open_one: OpenOne[_T], *,
             fallback: bool = True) -> _T:
    """Open the checkpoint ``path`` names: a checkpoint, ``latest``, ``latest.json`` (or
    ``best``, ``best.json``), a checkpoints directory, a run directory, or
    ``outputs/<run_name>`` (its newest run); ``fallback``: as :func:`_through_latest`."""
    if (named := _named_pointer(store, path)) is not None:
        return _through_latest(store, named[0], shown, open_one, named[1],
                               fallback=fallback)
    path = followed(store, path)
    name = name_of(path)
    children = store.listdir(path)
    if children is not None:
        if layout.RUNTIME_JSON in children or layout.parse_checkpoint_name(name) is not None:
            try:
                return _open_named(store, path, open_one)
            except Gone as gone:
                raise CheckpointNotFoundError(
                    store.url(path), nearby(store, path), hint=gone.hint
                ) from None
        if holds_checkpoints(children):
            return _through_latest(store, path, shown, open_one, fallback=fallback)
        ckpts = run_checkpoints(store, path, children)
        if ckpts is not None:
            return _through_latest(store, ckpts, shown, open_one, fallback=fallback)
        # outputs/<run_name>: the newest run that has a checkpoint to resume from.
        for run in reversed(timestamped_runs(store, path, children)):
            ckpts = run_checkpoints(store, run)
            if ckpts is None:
                continue
            try:
                return _through_latest(store, ckpts, shown, open_one, fallback=fallback)
            except CheckpointNotFoundError:
                continue  # no valid checkpoint in this run (it died before its first)
    else:
        entry = store.stat(path)
        parent = store.parent(path)
        marker = store.stat(store.join(parent, layout.RUNTIME_JSON))
        if entry is not None and entry.kind == "file" and marker is not None \
                and marker.kind == "file":
            raise CheckpointNotFoundError(
                shown, [store.url(parent)],
                hint=f"That is a file inside checkpoint {name_of(parent)}: "
                     f"pass the checkpoint directory {store.url(parent)} instead.",
            )
    raise not_found(store, path, shown)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Turn what a user may pass as ``resume_from`` into one verified checkpoint directory.

    Accepts a checkpoint directory, the ``latest`` symlink, ``latest.json``, a
    ``checkpoints/`` directory (its latest), a run directory, or ``outputs/<run_name>``
    (its newest run); a local path or a URL (``s3://...``, returned as a ``URLPath``).

    Raises:
        CheckpointNotFoundError: nothing there; the message lists checkpoints nearby.
        CheckpointCorruptError: a named checkpoint is broken (the file is named).
        StorageError: the store cannot be read.
    """
    store, where = open_location(path)
    ckpt = guarded(store, where, "resolving",
                   lambda: _resolve(store, where, os.fspath(path), partial(verified, store)))
    return store.as_path(ckpt)


def verify_checkpoint(path: str | os.PathLike[str]) -> RuntimeManifest:
    """Check every file of one checkpoint against its size and sha256.

    ``path`` is a checkpoint directory, or ``latest``, ``latest.json``, ``best`` or
    ``best.json``: the checkpoint the pointer names (by the readers' rules, on every
    backend, never a fallback: a broken one is reported); a checkpoints directory or a
    run directory means its ``latest``, ``outputs/<run_name>`` its newest run's, as for
    :func:`load_checkpoint` but without its fallback (``ckptwriter verify DIR`` checks
    every checkpoint of a directory instead). A live writer never makes it
    fail: a pointer that moves, or a checkpoint re-committed mid-read, is read again.

    Returns:
        the validated runtime manifest.

    Raises:
        CheckpointNotFoundError: no checkpoint there (a checkpoint named directly may have
            been retired by a live writer's retention).
        CheckpointCorruptError: a file is missing, damaged or unsafe (the file is named).
        StorageError: the store cannot be read.
    """
    store, where = open_location(path)

    def check(ckpt: str, seen: Seen) -> RuntimeManifest:
        return read_checkpoint(store, ckpt, seen, keep=False).runtime

    def verify() -> RuntimeManifest:
        ckpt = followed(store, where)
        named = _named_pointer(store, where) or _named_pointer(store, ckpt)
        if named is not None:
            return _through_latest(store, named[0], os.fspath(path), check, named[1],
                                   fallback=False)
        # A checkpoint, or what names one as load_checkpoint reads it (a checkpoints or
        # run directory: its latest; outputs/<run_name>: its newest run), never a fallback.
        return _resolve(store, where, os.fspath(path), check, fallback=False)

    return guarded(store, where, "verifying", verify)


def load_checkpoint(
    path: str | os.PathLike[str], *, expected_memory_type: str | None = None,
    entry_types: Iterable[type] = (), raw: bool = False, state_types: Iterable[type] = (),
) -> LoadedCheckpoint:
    """Resolve, verify and read a checkpoint, reading each of its files once.

    Args:
        path: anything :func:`resolve_checkpoint` accepts.
        expected_memory_type: if given, the checkpoint's memory type must match.
        entry_types: the caller's own memory entry types (as for ``MemoryLog``); a
            checkpoint never imports code, so every type its memory holds besides the
            built-ins must be passed.
        raw: log entries and model-typed state values as plain data (for inspection).
        state_types: the classes of model-typed values of the agent state.

    Raises:
        CheckpointNotFoundError, CheckpointCorruptError, MemoryTypeMismatchError
        (UnknownEntryTypeError: the memory or a log holds a type not passed;
        UnknownStateTypeError: a state value's class was not passed; ClassMismatchError: a
        class changed since it was written, which is never a fallback), StorageError.
        TypeError: a class in ``entry_types`` cannot be an entry type.
    """
    types, stypes = tuple(entry_types), tuple(state_types)
    for classes in (types, stypes):  # a class that cannot be one fails here, not later
        entry_types_of(classes)
    store, where = open_location(path)
    load = partial(loaded, store, expected_memory_type, entry_types=types, raw=raw,
                   state_types=stypes)
    return guarded(store, where, "loading",
                   lambda: _resolve(store, where, os.fspath(path), load))


def list_checkpoints(checkpoints_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Checkpoints of a checkpoints directory, oldest first (see :class:`CheckpointInfo`).

    Raises:
        StorageError: the store cannot be read.
    """
    store, where = open_location(checkpoints_dir)
    return guarded(store, where, "listing", lambda: scan(store, followed(store, where)))
