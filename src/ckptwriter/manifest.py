"""The JSON documents of a checkpoint: ``runtime.json``, ``agent.json``, ``latest.json``.

Pydantic models validate what is read back (hostile or damaged manifests are rejected
with a message naming the field); writing goes through msgspec with a two-space indent,
so ``grep episode_index runtime.json`` prints one line as the guide shows.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator

from .layout import FORMAT_VERSION

__all__ = [
    "MAX_DOCUMENT_BYTES", "AgentManifest", "EntryTypeRecord", "FileDigest", "LatestPointer",
    "LogRecord", "RuntimeManifest", "StateRecord", "dump_json",
]

# The most a reader takes of a document it reads before knowing any size (runtime.json,
# latest.json, best.json): ckptwriter writes them in kilobytes (a runtime.json lists
# about 130 bytes per file); a planted multi-terabyte sparse file must not be read whole.
MAX_DOCUMENT_BYTES = 8 * 2**20

_ENCODER = msgspec.json.Encoder()


def dump_json(obj: Any) -> bytes:
    """Encode a manifest: indented, newline-terminated."""
    return msgspec.json.format(_ENCODER.encode(obj), indent=2) + b"\n"


def format_timestamp(ts: datetime) -> str:
    """ISO-8601 in UTC with microseconds and a ``Z``: ``2024-01-15T10:30:45.123456Z``."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_plain_name(value: str) -> str:
    """Reject names that could leave a checkpoint directory (absolute, ``..``, subdirs)."""
    if (
        not value
        or value in {".", ".."}
        or "/" in value
        or "\\" in value
        or "\x00" in value
    ):
        raise ValueError(f"{value!r} is not a plain file name inside the checkpoint")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class FileDigest(_Model):
    """Size and checksum of one file of a checkpoint."""

    bytes: NonNegativeInt
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RuntimeManifest(_Model):
    """``runtime.json``: written last, its presence commits the checkpoint."""

    timestamp: str
    episode_index: NonNegativeInt
    train_steps_total: NonNegativeInt
    agent_type: str
    memory_snapshot_path: str
    val_score: float | None = None
    format_version: int
    memory_entries: NonNegativeInt = 0
    resumed_from: str | None = None
    files: dict[str, FileDigest]

    @field_validator("memory_snapshot_path")
    @classmethod
    def _plain_memory_path(cls, v: str) -> str:
        return check_plain_name(v)

    @field_validator("files")
    @classmethod
    def _plain_file_names(cls, v: dict[str, FileDigest]) -> dict[str, FileDigest]:
        for name in v:
            check_plain_name(name)
        return v

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is not supported (this ckptwriter reads {FORMAT_VERSION}); "
                "upgrade ckptwriter or resume from a checkpoint written by this version"
            )
        return v


class EntryTypeRecord(_Model):
    """A user entry type of the memory or a log, as recorded (never imported)."""

    model_config = ConfigDict(frozen=True, extra="ignore", serialize_by_alias=True)

    class_: str = Field(alias="class")
    fingerprint: str = ""


class LogRecord(_Model):
    """A named log of the checkpoint: its file and entry count."""

    file: str
    entries: NonNegativeInt = 0
    memory_type: str = "history"

    @field_validator("file")
    @classmethod
    def _plain(cls, v: str) -> str:
        return check_plain_name(v)


class StateRecord(_Model):
    """A key of agent state: its file, its kind (json, model, bytes), a model's class."""

    model_config = ConfigDict(frozen=True, extra="ignore", serialize_by_alias=True)

    file: str
    kind: Literal["json", "model", "bytes"]
    class_: str | None = Field(default=None, alias="class")
    tag: str | None = None

    @field_validator("file")
    @classmethod
    def _plain(cls, v: str) -> str:
        return check_plain_name(v)


class AgentManifest(_Model):
    """``agent.json``: what agent wrote the checkpoint and with what memory type.

    ``entry_types``, ``logs`` and ``state`` are absent from checkpoints without them.
    """

    agent_type: str
    memory_type: str
    config: dict[str, Any] = Field(default_factory=dict)
    entry_types: dict[str, EntryTypeRecord] = Field(default_factory=dict)
    logs: dict[str, LogRecord] = Field(default_factory=dict)
    state: dict[str, StateRecord] = Field(default_factory=dict)


class LatestPointer(_Model):
    """``latest.json``: the pointer readers use where a symlink is not available."""

    checkpoint: str
    episode_index: NonNegativeInt
    timestamp: str | None = None
    val_score: float | None = None

    @field_validator("checkpoint")
    @classmethod
    def _plain(cls, v: str) -> str:
        return check_plain_name(v)
