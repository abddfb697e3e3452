"""What the training loop hands to the writer, and how it is captured.

A :class:`Snapshot` names live objects (the agent's :class:`MemoryLog`, its config).
:meth:`Snapshot.capture` turns it into a :class:`CapturedSnapshot` that no later change
to the agent can alter: the memory is captured in O(1) (its log is append-only) and the
small JSON parts are encoded to bytes on the spot, which copies them.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import msgspec

from .errors import CheckpointError
from .layout import path_text
from .manifest import dump_json
from .memory import MemoryCapture, MemoryLog
from .nonfinite import NONFINITE_FIX, find_nonfinite, may_hold_nonfinite

__all__ = ["CapturedSnapshot", "Snapshot", "SnapshotMeta"]

_ENCODER = msgspec.json.Encoder(order="deterministic")
_RESERVED = frozenset({"runtime.json", "agent.json"})


@dataclass(frozen=True)
class Snapshot:
    """The state of a run at the end of an episode.

    Args:
        episode_index: episodes completed (the checkpoint is named ``ep_%06d``).
        train_steps_total: agent steps taken so far.
        agent_type: class name of the agent, e.g. ``"HistoryAgent"``.
        memory: the agent's append-only memory log.
        agent_config: JSON-able agent configuration, stored in ``agent.json``.
        memory_type: label of the memory implementation, checked on resume.
        val_score: latest validation score, used by the ``top_k_val`` strategy.
        extra_files: user state, name -> JSON-able object or ``bytes``.
        resumed_from: the checkpoint this run was resumed from, recorded in runtime.json.
    """

    episode_index: int
    train_steps_total: int
    agent_type: str
    memory: MemoryLog
    agent_config: Mapping[str, Any] = field(default_factory=dict)
    memory_type: str | None = None
    val_score: float | None = None
    extra_files: Mapping[str, Any] = field(default_factory=dict)
    resumed_from: str | os.PathLike[str] | None = None

    def capture(self) -> CapturedSnapshot:
        """Freeze this snapshot: O(1) in the memory size, O(size) in the small JSON parts.

        Raises:
            CheckpointError: a field has a value that cannot be written.
        """
        for name in ("episode_index", "train_steps_total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"Snapshot.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.agent_type, str) or not self.agent_type:
            raise CheckpointError(
                f"Snapshot.agent_type must be a non-empty str, got {self.agent_type!r}"
            )
        if self.memory_type is not None and not isinstance(self.memory_type, str):
            raise CheckpointError(
                f"Snapshot.memory_type must be a str or None, got {self.memory_type!r}"
            )
        if not isinstance(self.memory, MemoryLog):
            raise CheckpointError(
                f"Snapshot.memory must be a ckptwriter.MemoryLog, got {type(self.memory).__name__}"
            )
        # runtime.json is JSON (UTF-8): a path that is not UTF-8 goes in as its file: URI.
        resumed_from = (None if self.resumed_from is None
                        else path_text(os.fspath(self.resumed_from)))
        score = self.val_score
        if score is not None:
            score = float(score)
            if not math.isfinite(score):
                raise CheckpointError(f"Snapshot.val_score must be finite, got {score!r}")
        memory_type = self.memory_type or self.memory.memory_type
        try:
            agent_json = dump_json(
                {"agent_type": self.agent_type, "memory_type": memory_type,
                 "config": dict(self.agent_config)}
            )
            extras = {name: _encode_extra(name, obj) for name, obj in self.extra_files.items()}
        except (TypeError, msgspec.EncodeError) as exc:
            # The extra files raise their own error, naming the file.
            raise CheckpointError(
                f"Snapshot for episode {self.episode_index}: agent_config is not JSON-able "
                f"({_json_problem(exc)}). Keep it JSON; pass bytes in extra_files for "
                "state that is not JSON."
            ) from exc
        meta = SnapshotMeta(
            episode_index=self.episode_index,
            train_steps_total=int(self.train_steps_total),
            agent_type=self.agent_type,
            memory_type=memory_type,
            val_score=score,
            agent_json=agent_json,
            extra_files=extras,
            resumed_from=resumed_from,
            timestamp=datetime.now(timezone.utc),
        )
        return CapturedSnapshot(meta, self.memory.capture(), time.perf_counter())


def _json_problem(exc: Exception) -> str:
    text = str(exc)
    if "str keys" in text:
        return "a dict has a key that is not a str; convert keys with str(key)"
    return text


def _encode_extra(name: str, obj: Any) -> bytes:
    if not name or "/" in name or "\\" in name or name in {".", ".."} or name.startswith("."):
        raise CheckpointError(
            f"extra_files name {name!r} is not a plain file name; use a name like 'optimizer.json'"
        )
    if name in _RESERVED or (name.startswith("memory_") and name.endswith(".jsonl")):
        raise CheckpointError(f"extra_files name {name!r} is reserved by ckptwriter; rename it")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    try:
        data = _ENCODER.encode(obj)
    except (TypeError, msgspec.EncodeError) as exc:
        # msgspec's own words ("Only dicts with str keys are supported when `order` is
        # not `None`") name neither the file nor the fix.
        raise CheckpointError(
            f"extra_files[{name!r}] is not JSON-able ({_json_problem(exc)}). Make it "
            "JSON (dicts with str keys, lists, str, numbers, bools, None) or pass bytes "
            "for state that is not JSON."
        ) from exc
    if may_hold_nonfinite(data) and (where := find_nonfinite(obj, f"extra_files[{name!r}]")):
        raise CheckpointError(f"{where}: {NONFINITE_FIX}")
    return data


class SnapshotMeta(msgspec.Struct, frozen=True):
    """Everything of a captured snapshot but its memory: small, already encoded parts.

    It crosses to the writer process as it is (one msgpack encode), beside the memory
    bytes appended since that process's previous commit.
    """

    episode_index: int
    train_steps_total: int
    agent_type: str
    memory_type: str
    val_score: float | None
    agent_json: bytes
    extra_files: dict[str, bytes]
    resumed_from: str | None
    timestamp: datetime


@dataclass(frozen=True, slots=True)
class CapturedSnapshot:
    """A snapshot frozen at submit time; what the background writer persists."""

    meta: SnapshotMeta
    memory: MemoryCapture
    # perf_counter() at capture, for submit-to-durable latency (0.0 in the writer process).
    captured_at: float = 0.0

    @property
    def episode_index(self) -> int:
        """The episode the snapshot was taken after."""
        return self.meta.episode_index

    @property
    def val_score(self) -> float | None:
        """The validation score, if any."""
        return self.meta.val_score
