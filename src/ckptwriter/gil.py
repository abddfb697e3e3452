"""The GIL switch interval, lowered on request for loops that never really block."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

__all__ = ["switch_interval", "warn_starved"]

log = logging.getLogger("ckptwriter")


@contextlib.contextmanager
def switch_interval(seconds: float = 0.0005) -> Iterator[None]:
    """Lower CPython's GIL switch interval for the duration of a block.

    In a CPU-bound loop that never really blocks, a background writer thread at the
    default 5 ms interval can wait that long for every syscall it returns from; at
    0.5 ms it keeps up. This changes an interpreter-wide setting, so the library never
    does it on its own: the ``ckptwriter train`` runtime and benchmarks opt in here.
    """
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def warn_starved(episode_index: int, seconds: float) -> None:
    """Say, once per writer, that a writer thread looks starved of the GIL, and the fix."""
    log.warning(
        "checkpoint for episode %d has been in progress for %.1f s: if the training loop "
        "never really blocks, it starves the writer thread of the GIL; wrap the loop in "
        "`with ckptwriter.switch_interval():` (see README, 'Where the writer runs')",
        episode_index, seconds,
    )
