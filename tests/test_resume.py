"""ckptwriter.resume is a re-export of the one reader until the cut-over (its tests moved
to tests/test_reader.py)."""

from __future__ import annotations

from ckptwriter import reader, resume
from ckptwriter.storage import remote_read
from ckptwriter.storage.urlpath import URLPath


def test_resume_names_are_the_readers() -> None:
    """Code not yet switched to ckptwriter.reader gets the reader's own functions."""
    for name in ("CheckpointFallbackWarning", "CheckpointInfo", "LoadedCheckpoint",
                 "list_checkpoints", "load_checkpoint", "resolve_checkpoint",
                 "verify_checkpoint"):
        assert getattr(resume, name) is getattr(reader, name)
    assert resume.scan_checkpoints is reader.list_checkpoints


def test_remote_read_names_are_the_readers() -> None:
    """The object-storage reader is the same reader; URLPath lives in storage.urlpath."""
    assert remote_read.load_checkpoint is reader.load_checkpoint
    assert remote_read.scan_store is reader.scan
    assert remote_read.URLPath is URLPath
