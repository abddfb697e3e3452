"""A real S3 HTTP endpoint on 127.0.0.1 (moto's server) and per-backend test helpers.

The server runs in this process (a werkzeug thread) on a free port. s3fs reaches it
through ``AWS_ENDPOINT_URL``, exactly as a user would point ckptwriter at an
S3-compatible store, with dummy credentials from the usual environment variables.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BUCKET = "ckptwriter-test"
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never ask an EC2 metadata service for credentials: no network beyond 127.0.0.1.
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
    # A proxy configured on the machine must not see requests to the local server.
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


class _Server:
    """One moto server per test session, shared by every module that uses the fixture.

    Each test module imports ``s3_endpoint``, which makes one session fixture per module;
    a reference count keeps a single server and stops it with the last of them.
    """

    users = 0
    endpoint = ""
    server: Any = None
    env: pytest.MonkeyPatch | None = None

    @classmethod
    def acquire(cls) -> str:
        if cls.users == 0:
            from moto.server import ThreadedMotoServer

            # One log line per request otherwise, printed on every failure.
            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            cls.server, cls.endpoint = server, f"http://{host}:{port}"
            env = cls.env = pytest.MonkeyPatch()
            for k, v in _ENV.items():
                env.setenv(k, v)
            env.delenv("AWS_PROFILE", raising=False)
            env.delenv("AWS_ENDPOINT_URL_S3", raising=False)
            env.setenv("AWS_ENDPOINT_URL", cls.endpoint)
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir(BUCKET)
        cls.users += 1
        return cls.endpoint

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            if cls.env is not None:
                cls.env.undo()
            cls.server.stop()
            cls.server = cls.env = None


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free local port, s3fs pointed at it, the test bucket created."""
    endpoint = _Server.acquire()
    try:
        yield endpoint
    finally:
        _Server.release()


@dataclass
class Backend:
    """One storage backend under test: where checkpoints go and raw access to it."""

    kind: str
    url: str
    fs: Any = None
    root: str = ""

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def write_raw(self, rel: str, data: bytes) -> None:
        """Write one file/object bypassing ckptwriter (what a crashed writer leaves)."""
        if self.fs is None:
            p = Path(self.url) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        else:
            self.fs.pipe_file(self._path(rel), data)

    def read_raw(self, rel: str) -> bytes:
        """Read one file/object bypassing ckptwriter."""
        if self.fs is None:
            return (Path(self.url) / rel).read_bytes()
        self.fs.invalidate_cache()
        return bytes(self.fs.cat_file(self._path(rel)))

    def names(self) -> set[str]:
        """Every file/object under the checkpoints location, relative to it."""
        if self.fs is None:
            base = Path(self.url)
            return {str(p.relative_to(base)) for p in base.rglob("*") if not p.is_dir()}
        self.fs.invalidate_cache()
        prefix = self.root + "/"
        return {p[len(prefix):] for p in self.fs.find(self.root) if p.startswith(prefix)}

    def crash_artifact(self, name: str) -> str:
        """Where a writer that died mid-checkpoint left the checkpoint's first objects."""
        # Local disk writes into a temp dir renamed at the end; object stores have no
        # rename, so a dead writer leaves objects under the final prefix, no marker.
        return f".tmp-{name}-dead0001" if self.fs is None else name


def make_backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    """A fresh, empty checkpoints location on ``kind`` (local, memory or s3)."""
    if kind == "local":
        return Backend("local", str(tmp_path / "checkpoints"))
    import fsspec

    run = uuid.uuid4().hex[:12]
    if kind == "memory":
        url = f"memory://ckptwriter-{run}/checkpoints"
    else:
        request.getfixturevalue("s3_endpoint")
        url = f"s3://{BUCKET}/{run}/checkpoints"
    fs, root = fsspec.core.url_to_fs(url)
    backend = Backend(kind, url, fs, root.rstrip("/"))
    if kind == "memory":
        def cleanup() -> None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f"/ckptwriter-{run}", recursive=True)

        request.addfinalizer(cleanup)
    return backend


BACKENDS = [
    pytest.param("local", id="local"),
    pytest.param("memory", id="memory"),
    pytest.param("s3", id="s3", marks=pytest.mark.s3),
]
REMOTE_BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("s3", id="s3", marks=pytest.mark.s3),
]
