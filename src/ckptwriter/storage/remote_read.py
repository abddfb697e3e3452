"""Re-exports of the one reader (:mod:`ckptwriter.reader`) for code not yet switched to it.

# removed at the cut-over
"""

from __future__ import annotations

from ..reader import list_checkpoints as list_checkpoints
from ..reader import load_checkpoint as load_checkpoint
from ..reader import resolve_checkpoint as resolve_checkpoint
from ..reader import scan as scan_store
from ..reader import verify_checkpoint as verify_checkpoint
from .urlpath import URLPath as URLPath

__all__ = [
    "URLPath",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "scan_store",
    "verify_checkpoint",
]
