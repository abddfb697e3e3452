"""What the writer's open does about a ``latest`` it finds wrong, before any commit.

Two states a reader would otherwise refuse or misread, and which only the owner of the
directory may put right:

- ``latest`` behind: a run killed between committing ``ep_M`` and moving ``latest``
  leaves it on an older ``ep_N``, though ``ep_M`` is whole and durable. A higher episode
  committed *before* ``ep_N`` (``replace=True`` going back) is another history: left
  alone. The rule is the CLI resume's: committed strictly later by the capture time
  runtime.json records (wall clock, so a history written while the clock ran ahead of
  the one that later went back would look later).
- ``latest`` unusable: a symlink that leads outside the directory (planted) or to no
  whole checkpoint (removed by hand). It is replaced, never followed, by what
  ``latest.json`` names if that is whole, else by the newest whole checkpoint.

A failure to move the pointer is a warning: the next commit moves it anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from pydantic import ValidationError

from . import layout
from .errors import CheckpointError
from .integrity import CheckpointInfo
from .manifest import MAX_DOCUMENT_BYTES, LatestPointer
from .storage.base import Backend

__all__ = ["repair_latest"]

log = logging.getLogger("ckptwriter")


def repair_latest(b: Backend, whole: Sequence[CheckpointInfo],
                  docs: Mapping[str, bytes]) -> None:
    """Point ``latest`` at the checkpoint it should name, if it names another (see the
    module docstring); ``docs``: each whole checkpoint's pointer document."""
    if not whole:
        return
    by_name = {i.name: i for i in whole}
    named = by_name.get(_json_target(b) or "")
    link = b.store.readlink(b.store.join(b.root, layout.LATEST_LINK))
    if link is not None and link not in by_name:
        target = named or max(whole, key=lambda i: i.episode_index)
        _move(b, docs, target.name, f"latest pointed at {link!r}, which is no whole "
              f"checkpoint of this directory (not followed)")
        named = target
    if named is None or named.runtime is None:
        return  # no usable latest.json: readers fall back from it, the next commit writes it
    stamp, ep = named.runtime.timestamp, named.episode_index
    later = [i for i in whole if i.runtime is not None and i.episode_index > ep
             and i.runtime.timestamp > stamp]
    if later:
        newest = max(later, key=lambda i: i.episode_index)
        _move(b, docs, newest.name, f"latest named {named.name}, but {newest.name} was "
              "committed after it and is whole (a run stopped between committing it and "
              "moving latest)")


def _json_target(b: Backend) -> str | None:
    try:
        return LatestPointer.model_validate_json(b.store.read(
            b.store.join(b.root, layout.LATEST_JSON), limit=MAX_DOCUMENT_BYTES)).checkpoint
    except (OSError, ValidationError):
        return None


def _move(b: Backend, docs: Mapping[str, bytes], name: str, why: str) -> None:
    try:
        b.replace_pointer(name, docs[name])
    except CheckpointError as exc:
        log.warning("%s; moving latest to %s failed (%s)", why, name, exc)
        return
    log.warning("%s: latest now names %s", why, name)
