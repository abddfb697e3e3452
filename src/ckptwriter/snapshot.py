"""What the training loop hands to the writer, and how it is captured.

A :class:`Snapshot` names live objects (the agent's :class:`MemoryLog`, its named logs,
its :class:`AgentState`, its config). :meth:`Snapshot.capture` turns it into a
:class:`CapturedSnapshot` that no later change to the agent can alter: each log is
captured in O(1) (it is append-only), the state in O(number of keys) (each value was
encoded when it was set), and the small JSON parts are encoded to bytes on the spot.
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

from . import layout
from .agent_state import AgentState, StateItem, check_name
from .entry_codec import entry_types as entry_types_of
from .errors import CheckpointError
from .exact import a_noun
from .layout import EXTRA_NAME_RULE, extra_name_problem, log_file_name, path_text
from .manifest import dump_json
from .memory import MemoryCapture, MemoryLog
from .state_codec import class_path, encode_json, fingerprint

__all__ = ["CapturedSnapshot", "Snapshot", "SnapshotMeta"]

_ENCODER = msgspec.json.Encoder(order="deterministic")


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
        logs: named logs besides the memory, name -> :class:`MemoryLog`, each written
            incrementally as ``log.<name>.jsonl``.
        state: the agent's :class:`AgentState` (a plain mapping works too, encoded
            again at every capture: slower); each key is a file ``state.<key>.json``
            (or ``.bin`` for bytes), written only when the key was set since the
            previous checkpoint.
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
    logs: Mapping[str, MemoryLog] = field(default_factory=dict)
    state: AgentState | Mapping[str, Any] | None = None

    def capture(self) -> CapturedSnapshot:
        """Freeze this snapshot: O(1) in the memory size, O(size) in the small JSON parts.

        Raises:
            CheckpointError: a field has a value that cannot be written.
        """
        for name in ("episode_index", "train_steps_total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"Snapshot.{name} must be an int >= 0, got {value!r}")
        if self.episode_index > layout.MAX_EPISODE_INDEX:
            raise CheckpointError(
                f"Snapshot.episode_index must be at most {layout.MAX_EPISODE_INDEX:,} (18 "
                f"digits in the checkpoint's name), got an int of "
                f"{int(self.episode_index.bit_length() * 0.30103) + 1} digits"
            )
        _check_text(self.agent_type, "agent_type", required=True)
        _check_text(self.memory_type, "memory_type", required=False)
        if not isinstance(self.memory, MemoryLog):
            raise CheckpointError(
                f"Snapshot.memory must be a ckptwriter.MemoryLog, got {type(self.memory).__name__}"
            )
        # runtime.json is JSON (UTF-8): a path that is not UTF-8 goes in as its file: URI.
        resumed_from = (None if self.resumed_from is None
                        else path_text(os.fspath(self.resumed_from)))
        score = _check_score(self.val_score)
        memory_type = self.memory_type or self.memory.memory_type
        _check_text(memory_type, "memory_type (or the MemoryLog's)", required=False)
        logs = self._capture_logs()
        state = self._capture_state()
        for what, part in (("agent_config", self.agent_config),
                           ("extra_files", self.extra_files)):
            if not isinstance(part, Mapping):
                raise CheckpointError(f"Snapshot.{what} must be a mapping (a dict), got "
                                      f"{type(part).__name__}")
        # Checked as extra files are, so both load back exactly as they were handed over.
        config = dict(self.agent_config)
        _checked_json(config, "Snapshot.agent_config", _CONFIG_FIX,
                      "an extra file (Snapshot(extra_files=...))")
        extras = {name: _encode_extra(name, obj) for name, obj in self.extra_files.items()}
        agent_json = dump_json(self._agent_document(memory_type, logs, state, config))
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
        return CapturedSnapshot(meta, self.memory.capture(), time.perf_counter(),
                                {n: cap for n, (_, cap) in logs.items()}, state)

    def _capture_logs(self) -> dict[str, tuple[MemoryLog, MemoryCapture]]:
        out: dict[str, tuple[MemoryLog, MemoryCapture]] = {}
        if not isinstance(self.logs, Mapping):
            raise CheckpointError(
                f"Snapshot.logs must be a mapping of name -> MemoryLog, got {self.logs!r}")
        for name, log in self.logs.items():
            try:
                check_name(name, "Snapshot.logs name")
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
            if name == "memory":
                raise CheckpointError(
                    "Snapshot.logs name 'memory' is reserved: the memory is Snapshot(memory=...); "
                    "give this log another name")
            if not isinstance(log, MemoryLog):
                raise CheckpointError(f"Snapshot.logs[{name!r}] must be a ckptwriter.MemoryLog, "
                                      f"got {type(log).__name__}")
            _check_text(log.memory_type, f"logs[{name!r}].memory_type", required=False)
            out[name] = (log, log.capture())
        return out

    def _capture_state(self) -> dict[str, StateItem]:
        if self.state is None:
            return {}
        if isinstance(self.state, AgentState):
            return self.state.capture()
        if not isinstance(self.state, Mapping):
            raise CheckpointError("Snapshot.state must be an AgentState or a mapping, got "
                                  f"{type(self.state).__name__}")
        try:
            return AgentState(self.state).capture()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"Snapshot.state: {exc}") from exc

    def _agent_document(self, memory_type: str, logs: Mapping[str, tuple[MemoryLog, Any]],
                        state: Mapping[str, StateItem], config: dict[str, Any],
                        ) -> dict[str, Any]:
        doc: dict[str, Any] = {"agent_type": self.agent_type, "memory_type": memory_type,
                               "config": config}
        types: dict[str, Any] = {}
        # agent.json maps each tag to one class, and loading takes one class per tag:
        # two classes of one tag would load one log's entries through the other's class.
        seen: dict[str, tuple[type, str]] = {}
        named = [("the memory", self.memory), *((f"log {n!r}", lg) for n, (lg, _) in logs.items())]
        for where, log in named:
            if log.entry_types:
                by_cls = entry_types_of(log.entry_types).by_cls
                for cls in log.entry_types:
                    tag = by_cls[cls].tag
                    _refuse_tag_clash(tag, seen.setdefault(tag, (cls, where)), (cls, where))
                    types[tag] = {"class": class_path(cls), "fingerprint": fingerprint(cls)}
        models: dict[str, tuple[str, str]] = {}
        for key, it in state.items():
            if it.value.kind == "model" and it.value.tag is not None:
                was = models.setdefault(it.value.tag, (it.value.cls or "", f"state[{key!r}]"))
                if was[0] != (it.value.cls or ""):
                    _refuse_tag_clash(it.value.tag, was, (it.value.cls or "", f"state[{key!r}]"))
        if types:
            doc["entry_types"] = types
        if logs:
            doc["logs"] = {n: {"file": log_file_name(n), "entries": cap.entries,
                               "memory_type": lg.memory_type}
                           for n, (lg, cap) in logs.items()}
        if state:
            doc["state"] = {k: _state_entry(it) for k, it in state.items()}
        return doc


def _refuse_tag_clash(tag: str, first: tuple[Any, str], other: tuple[Any, str]) -> None:
    """Two different classes with one ``type`` tag: a CheckpointError naming both."""
    if first[0] is other[0]:
        return
    a, b = (c if isinstance(c, str) else class_path(c) for c in (first[0], other[0]))
    raise CheckpointError(
        f"two classes have the type tag {tag!r}: {a} (in {first[1]}) and {b} (in "
        f"{other[1]}); a checkpoint maps each tag to one class, so one of them would load "
        "as the other. Rename one of the classes or give it its own tag (a first field "
        f"`type: Literal['...'] = '...'`, or msgspec's tag=...)")


def _state_entry(item: StateItem) -> dict[str, str]:
    v = item.value
    entry = {"file": item.file, "kind": v.kind}
    if v.kind == "model":
        entry.update({"class": v.cls or "", "tag": v.tag or ""})
    return entry


def _check_text(value: object, what: str, *, required: bool) -> None:
    """A str field of runtime.json / agent.json: JSON text (UTF-8), non-empty if required."""
    if value is None and not required:
        return
    if not isinstance(value, str) or (required and not value):
        kind = "a non-empty str" if required else "a str or None"
        raise CheckpointError(f"Snapshot.{what} must be {kind}, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CheckpointError(
            f"Snapshot.{what} {value!r} holds {value[exc.start:exc.end]!r} at index "
            f"{exc.start}, a lone surrogate that UTF-8 (JSON) cannot hold; fix the text, "
            "e.g. value.encode('utf-8', 'replace').decode()") from None


def _check_score(value: object) -> float | None:
    """``val_score`` as the finite float it is: a str or a bool is not a score."""
    if value is None:
        return None
    # Anything float() takes as a number is a score (a numpy float, a 0-d array or
    # tensor); text is not (float("0.5") parses it), and neither is True.
    if isinstance(value, (str, bytes, bytearray, bool)) \
            or not hasattr(type(value), "__float__"):
        raise CheckpointError(f"Snapshot.val_score must be a float (or None), got {value!r} "
                              f"({type(value).__name__}); pass float(...) of the score")
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"Snapshot.val_score must be a single number, got "
                              f"{type(value).__name__}: {exc}") from None
    except OverflowError:
        kind = a_noun(type(value).__name__)
        raise CheckpointError(f"Snapshot.val_score is {kind} too large for a float; pass a "
                              "finite float score") from None
    if not math.isfinite(score):
        raise CheckpointError(f"Snapshot.val_score must be finite, got {score!r}")
    return score


_CONFIG_FIX = ("keep agent_config JSON data (dicts with str keys, lists, str, int, float, "
               "bool, None); pass state that is not JSON in extra_files as bytes")
_EXTRA_FIX = ("make it JSON data (dicts with str keys, lists, str, int, float, bool, None), "
              "or pass bytes for state that is not JSON")


def _checked_json(value: Any, where: str, fix: str, own: str,
                  encoder: msgspec.json.Encoder = _ENCODER) -> bytes:
    """``value``'s JSON if it loads back exactly as it is, else a CheckpointError."""
    try:
        return encode_json(value, where, encoder=encoder, fix=fix, own=own)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None


def _encode_extra(name: str, obj: Any) -> bytes:
    if (problem := extra_name_problem(name)) is not None:
        raise CheckpointError(f"extra_files name {name!r} {problem}: use {EXTRA_NAME_RULE}")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    return _checked_json(obj, f"extra_files[{name!r}]", _EXTRA_FIX, "an extra file of its own")


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
    # Named logs (name -> capture) and state (key -> item), beside the memory.
    logs: Mapping[str, MemoryCapture] = field(default_factory=dict)
    state: Mapping[str, StateItem] = field(default_factory=dict)

    @property
    def episode_index(self) -> int:
        """The episode the snapshot was taken after."""
        return self.meta.episode_index

    @property
    def val_score(self) -> float | None:
        """The validation score, if any."""
        return self.meta.val_score
