"""Where checkpoints are: opening a location, run directories, checkpoints directories
under a path, and the checkpoints near a path that names none.

Written once over the read primitives (:class:`~ckptwriter.storage.base.ReadStore`), so
a local disk and object storage are searched by the same rules and runs come in the one
order :func:`ckptwriter.layout.run_sort_key` defines. The reader (``reader.py``) and the
inspection commands build on it.

Error handling:
    :func:`guarded` turns a store failure (an ``OSError``, a botocore error) into the
    :class:`~ckptwriter.StorageError` the store describes; ckptwriter's own errors and
    warnings pass through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import yaml

from . import layout
from .errors import CheckpointError, CheckpointNotFoundError, UnsafePathError
from .manifest import check_plain_name
from .storage.base import ReadStore
from .storage.location import open_store
from .storage.urlpath import URLPath

__all__ = [
    "POINTER_NAMES",
    "checkpoints_dirs",
    "followed",
    "guarded",
    "holds_checkpoints",
    "name_of",
    "nearby",
    "not_found",
    "open_location",
    "run_checkpoints",
    "timestamped_runs",
]

_T = TypeVar("_T")
# The pointers of a checkpoints directory (the symlinks and their JSON twins).
POINTER_NAMES = (layout.LATEST_LINK, layout.LATEST_JSON, layout.BEST_LINK, layout.BEST_JSON)
CONFIG_YAML = "config.yaml"
# What the config loader itself reads at most (config_yaml.MAX_FILE_BYTES).
_CONFIG_BYTES = 2**20
DEFAULT_CHECKPOINT_DIR = "checkpoints"
# A user's chain of symlinks to the path they named, never a loop.
_MAX_LINKS = 8
# Directory listings one "nearby" search may cost: it only decorates an error message,
# and on object storage each listing is a request.
_NEARBY_LISTINGS = 64
# Levels the "nearby" search climbs from the nearest existing directory: an existing but
# empty run directory has its checkpoints in its siblings.
_NEARBY_CLIMB = 3
# Depth below that directory at which checkpoints are looked for (ep_*, */ep_*, ...):
# 5 reaches outputs/<run_name>/<timestamp>/checkpoints/ep_* from the directory that
# holds outputs/ (a bare relative path typed in the project directory).
_NEARBY_DEPTH = 5


def open_location(location: str | os.PathLike[str]) -> tuple[ReadStore, str]:
    """The read primitives and store path for a location a user gave.

    Raises:
        ConfigError: no fsspec implementation for the URL's scheme.
        StorageError: the store cannot be reached (a missing bucket, bad credentials).
    """
    store, path = open_store(location)
    # ReadStore has no check_root (yet): object stores can fail early and clearly here
    # ("bucket ... does not exist"), where a listing would only say "nothing there".
    guarded(store, path, "opening", lambda: store.check_root(path))
    return store, path


def guarded(store: ReadStore, path: str, action: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn``; a store failure becomes the StorageError naming ``path`` and the fix."""
    try:
        return fn()
    except (CheckpointError, Warning):
        # Warning: under `-W error` a CheckpointFallbackWarning is raised, not printed.
        raise
    except OSError as exc:
        raise store.error(exc, action, path) from exc
    except Exception as exc:
        # fsspec and botocore fail with their own types (NoCredentialsError...); a
        # Python error (ValueError, RecursionError...) is a bug to see as itself.
        if type(exc).__module__ == "builtins":
            raise
        raise store.error(exc, action, path) from exc


def name_of(path: str) -> str:
    """The last component of a store path."""
    return path.rstrip("/").rpartition("/")[2]


def followed(store: ReadStore, path: str) -> str:
    """The path a user named, through their own symlinks to it (nothing below is followed).

    A pointer (``latest``, ``best`` and their ``.json``) is not followed here: it has its
    own rules. Nor is a checkpoint name: inside a checkpoints directory an ``ep_*`` that
    is a symlink is not a checkpoint (listings say "not a directory").

    Raises:
        UnsafePathError: the path (or a link of the user's chain) ends at an ``ep_*``
            symlink.
    """
    for _ in range(_MAX_LINKS):
        name = name_of(path)
        if name in POINTER_NAMES:
            break
        target = store.readlink(path)
        if target is None:
            break
        if layout.parse_checkpoint_name(name) is not None:
            raise UnsafePathError(
                store.url(store.parent(path)), name, f"is a symlink to {target}; refusing to "
                "follow it (a checkpoint is a real directory of its checkpoints directory)")
        path = store.join(store.parent(path), target)
    return path


def holds_checkpoints(children: list[str]) -> bool:
    """True if a directory with these entries is a checkpoints directory."""
    return (
        layout.LATEST_JSON in children
        or layout.LATEST_LINK in children
        or any(layout.parse_checkpoint_name(c) is not None for c in children)
    )


def _configured_dir(store: ReadStore, run: str) -> str:
    # A run may use another checkpoint_dir name; its config.yaml says which. Only a
    # relative path of plain names is taken: config.yaml must not lead a reader elsewhere.
    try:
        cfg = yaml.safe_load(store.read(store.join(run, CONFIG_YAML), limit=_CONFIG_BYTES))
        value = cfg["runtime"]["checkpoint_dir"]
    except (OSError, yaml.YAMLError, UnicodeDecodeError, TypeError, KeyError):
        return DEFAULT_CHECKPOINT_DIR
    if not isinstance(value, str):
        return DEFAULT_CHECKPOINT_DIR
    try:
        for part in value.split("/"):
            check_plain_name(part)
    except ValueError:
        return DEFAULT_CHECKPOINT_DIR
    return value


def run_checkpoints(
    store: ReadStore, run: str, children: list[str] | None = None
) -> str | None:
    """The checkpoints directory of a run directory, or None if ``run`` is not one."""
    children = store.listdir(run) if children is None else children
    if children is None or (CONFIG_YAML not in children
                            and DEFAULT_CHECKPOINT_DIR not in children):
        return None
    name = _configured_dir(store, run) if CONFIG_YAML in children else DEFAULT_CHECKPOINT_DIR
    ckpts = store.join(run, *name.split("/"))
    return ckpts if store.listdir(ckpts) is not None else None


def _sorted(names: list[str]) -> list[str]:
    return sorted((n for n in names if not n.startswith(".")), key=layout.run_sort_key)


def timestamped_runs(store: ReadStore, path: str, children: list[str]) -> list[str]:
    """The run directories (``<YYYYmmdd_HHMMSS>[_N]``) of ``outputs/<run_name>``, oldest first."""
    return [store.join(path, c) for c in _sorted(children) if layout.RUN_DIR_RE.match(c)]


def _runs_under(store: ReadStore, path: str, children: list[str], depth: int) -> list[str]:
    if run_checkpoints(store, path, children) is not None:
        return [path]
    if depth == 0:
        return []
    out: list[str] = []
    for name in _sorted(children):
        child = store.join(path, name)
        # listdir never goes through a symlink: a linked directory is not searched.
        sub = store.listdir(child)
        if sub is not None:
            out.extend(_runs_under(store, child, sub, depth - 1))
    return out


def _run_of(store: ReadStore, ckpts: str) -> str | None:
    run = store.parent(ckpts)
    entry = store.stat(store.join(run, CONFIG_YAML))
    return run if entry is not None and entry.kind == "file" else None


def checkpoints_dirs(store: ReadStore, path: str, shown: str) -> list[tuple[str, str | None]]:
    """Every checkpoints directory at or under ``path`` with its run directory, in run order.

    ``path`` may be a checkpoint (its checkpoints directory is meant), a checkpoints
    directory, a run directory, ``outputs/<run_name>/`` or ``outputs/``.

    Raises:
        CheckpointNotFoundError: ``path`` holds no checkpoints directory.
    """
    path = followed(store, path)
    if name_of(path) in POINTER_NAMES:
        path = store.parent(path)  # a pointer means its checkpoints directory
    children = store.listdir(path)
    if children is None:
        raise not_found(store, path, shown, "The path does not exist or is not a directory.")
    if (layout.RUNTIME_JSON in children
            or layout.parse_checkpoint_name(name_of(path)) is not None):
        parent = store.parent(path)
        return [(parent, _run_of(store, parent))]
    if holds_checkpoints(children):
        return [(path, _run_of(store, path))]
    found: list[tuple[str, str | None]] = []
    for run in _runs_under(store, path, children, depth=2):
        ckpts = run_checkpoints(store, run)
        if ckpts is not None:
            found.append((ckpts, run))
    if not found:
        # Searched nearby (as a load is), never just said to have been.
        hint = ("It is a checkpoints directory a writer has opened (it holds .lock), with "
                "no checkpoint committed yet." if layout.LOCK_FILE in children else
                "Expected a checkpoints directory, a run directory or outputs/<run_name>/.")
        try:
            error = not_found(store, path, shown, hint)
        except CheckpointError:
            # The search nearby is for the message only: a listing refused above the
            # path (credentials scoped to a prefix) must not replace "not found".
            error = CheckpointNotFoundError(shown, hint=hint, searched=False)
        raise error
    return found


def _searchable(store: ReadStore, path: str) -> bool:
    # Never search from the filesystem root, a top-level directory or a bucket's root: a
    # shared one may hold millions of entries, not worth listing for an error message.
    # Judged on the absolute path: a relative `outputs/x` climbs to `.`, which is the
    # working directory, not a root.
    if not isinstance(store.as_path(path), URLPath):
        path = os.path.abspath(path)
    up = store.parent(path)
    return up != path and store.parent(up) != up


def not_found(store: ReadStore, path: str, shown: str, hint: str = "") -> CheckpointNotFoundError:
    """The error for a path that names no checkpoint, with the hint that fits it.

    A missing run name (``outputs/<typo>``) lists the runs that do exist rather than
    the checkpoints of other runs, which look like a suggestion to resume from them.
    """
    anc, missing = path, ""
    while store.listdir(anc) is None:
        up = store.parent(anc)
        if up == anc:
            return CheckpointNotFoundError(shown, nearby(store, path), hint=hint)
        anc, missing = up, name_of(anc)
    children = store.listdir(anc) or []
    # Bounded like `nearby`: each child is one more listing (a request on object storage),
    # made only for a missing run name.
    runs = sorted(c for c in sorted(children)[:_NEARBY_LISTINGS] if not c.startswith(".")
                  and timestamped_runs(store, store.join(anc, c),
                                       store.listdir(store.join(anc, c)) or [])) \
        if missing else []
    if missing and runs and _searchable(store, anc) and not holds_checkpoints(children):
        where = store.url(anc)
        return CheckpointNotFoundError(shown, hint=" ".join(filter(None, (
            hint, f"There is no run {missing!r} in {where}; the runs there are: "
                  f"{', '.join(runs)} (`ckptwriter ls {where}` lists their checkpoints).",
        ))), searched=False)
    return CheckpointNotFoundError(shown, nearby(store, path), hint=hint)


def _newest_first(paths: list[str]) -> list[str]:
    return sorted(paths, key=lambda p: [layout.run_sort_key(c) for c in p.split("/")],
                  reverse=True)


def nearby(store: ReadStore, path: str, limit: int = 10) -> list[str]:
    """Committed checkpoints close to a path that names none, newest first, as shown to users."""
    anc = path
    while True:
        if not _searchable(store, anc):
            return []
        if store.listdir(anc) is not None:
            break
        anc = store.parent(anc)
    budget = [_NEARBY_LISTINGS]
    for _ in range(_NEARBY_CLIMB):
        if not _searchable(store, anc):
            return []
        found = _checkpoints_below(store, anc, limit, budget)
        if found:
            # `foo` typed in the project directory: show outputs/..., not ./outputs/...
            return [store.url(c).removeprefix("./") for c in found]
        anc = store.parent(anc)
    return []


def _checkpoints_below(store: ReadStore, top: str, limit: int, budget: list[int]) -> list[str]:
    """The nearest level below ``top`` that holds checkpoints: up to ``limit`` of them."""
    level = [top]
    for _ in range(_NEARBY_DEPTH):
        candidates: list[str] = []
        below: list[str] = []
        for d in level:
            if budget[0] <= 0:
                return []
            budget[0] -= 1
            for name in store.listdir(d) or []:
                if name.startswith("."):
                    continue
                child = store.join(d, name)
                if layout.parse_checkpoint_name(name) is not None:
                    candidates.append(child)
                elif name not in (layout.LATEST_LINK, layout.LATEST_JSON, CONFIG_YAML):
                    below.append(child)
        found: list[str] = []
        for c in _newest_first(candidates):
            if store.readlink(c) is not None:
                continue  # a symlinked ep_* is not a checkpoint of this tree
            marker = store.stat(store.join(c, layout.RUNTIME_JSON))
            if marker is not None and marker.kind == "file":
                found.append(c)
                if len(found) == limit:
                    break
        if found:
            return found
        level = below
    return []
