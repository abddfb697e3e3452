"""Writing a frame of any size to the writer process's pipe without blocking the loop.

The pipe's write end is a blocking fd: the loop writes a message that fits the (empty)
pipe in one call. A larger one goes in pieces: non-blocking writes, waiting for the pipe
to drain between them while the child reads.
"""

from __future__ import annotations

import os

import anyio

__all__ = ["send_in_pieces"]

# Buffers per writev (Linux's IOV_MAX).
_IOV_MAX = 1024


async def send_in_pieces(wfd: int, views: list[memoryview]) -> None:
    """Write every byte of ``views`` to the pipe ``wfd``, however many.

    Shielded from cancellation: a frame cut in the middle would desynchronize the pipe;
    the child is reading, so this ends as soon as it has the bytes (or is gone: EPIPE).

    Raises:
        OSError: the pipe is broken (the child exited).
    """
    pending = [v for v in views if len(v)]
    i = 0
    with anyio.CancelScope(shield=True):
        os.set_blocking(wfd, False)
        try:
            while i < len(pending):
                try:
                    n = os.writev(wfd, pending[i:i + _IOV_MAX])
                except BlockingIOError:
                    await anyio.wait_writable(wfd)
                    continue
                while n:
                    if n >= len(pending[i]):
                        n -= len(pending[i])
                        i += 1
                    else:
                        pending[i], n = pending[i][n:], 0
        finally:
            os.set_blocking(wfd, True)
