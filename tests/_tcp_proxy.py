"""A TCP proxy in front of moto's server that loses replies and cuts the network for real.

The client (s3fs/aiobotocore) talks to the proxy exactly as to a store: requests reach the
server and are applied; the proxy can then close the connection before the reply gets
back (the client sees a dropped connection and retries), or stop forwarding altogether.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

_CHUNK = 1 << 16


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to ``endpoint``; see :meth:`lose_reply` and :meth:`cut`.

    Args:
        endpoint: the server's URL (``http://127.0.0.1:NNNN``).
    """

    def __init__(self, endpoint: str) -> None:
        target = urlsplit(endpoint)
        self._target = (target.hostname or "127.0.0.1", target.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._needle: bytes | None = None
        self._socks: set[socket.socket] = set()
        self.lost = threading.Event()
        self._cut = False
        threading.Thread(target=self._accept, name="flaky-proxy", daemon=True).start()

    def lose_reply(self, request_prefix: bytes) -> None:
        """Let the next request starting with ``request_prefix`` (``b"PUT /bucket/key"``)
        reach the server, then drop its connection before the reply reaches the client."""
        with self._lock:
            self._needle = request_prefix
            self.lost.clear()

    def cut(self) -> None:
        """The network goes down: every connection is reset and no new one is accepted."""
        with self._lock:
            self._cut = True
            socks, self._socks = list(self._socks), set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for s in socks:
            _close(s)

    def close(self) -> None:
        """Stop the proxy."""
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._cut:
                    _close(client)
                    _close(upstream)
                    return
                self._socks.update((client, upstream))
            doomed = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, doomed),
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, doomed),
                             daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, doomed: threading.Event) -> None:
        while data := _recv(src):
            with self._lock:
                if self._needle is not None and data.startswith(self._needle):
                    self._needle = None
                    doomed.set()
            if not _send(dst, data):
                break
        _close(src)
        _close(dst)

    def _replies(self, src: socket.socket, dst: socket.socket, doomed: threading.Event) -> None:
        while data := _recv(src):
            # An interim "100 Continue" is not the reply; the final one is lost.
            if doomed.is_set() and not data.startswith(b"HTTP/1.1 100"):
                self.lost.set()
                break
            if not _send(dst, data):
                break
        _close(src)
        _close(dst)


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(_CHUNK)
    except OSError:
        return b""


def _send(s: socket.socket, data: bytes) -> bool:
    try:
        s.sendall(data)
    except OSError:
        return False
    return True


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
