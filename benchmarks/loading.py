"""Target 7: loading a large memory back, against msgspec decoding the same file.

7. ``load_checkpoint`` of a ``large_memory``-entry memory within 2x the time msgspec
   ``decode_lines`` takes to decode the same file into Structs, in the same process, and
   the load's peak RSS within 3x the file's size; for the built-in entry types and for a
   user-typed log (pydantic chat messages with nested tool calls).

A loaded memory builds its entry objects when they are read, so what is measured is the
load *and* reading every entry back (``memory[:]``, as a resumed HistoryAgent does from
its cursor): the lazy load alone is reported beside it. Each side runs in a fresh
interpreter (``ru_maxrss`` is a process's peak): the load and read first, their peak RSS
over the process's RSS before them, then the decode, alternating.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import msgspec
from pydantic import BaseModel, ConfigDict

from ckptwriter import MemoryLog, Snapshot, SyncCheckpointWriter, load_checkpoint

from .report import Figure, Report
from .sizes import BenchConfig
from .workload import Entry, fill_memory, median, scratch

__all__ = ["ChatMessage", "ToolCall", "bench_load"]

_REPO = Path(__file__).resolve().parent.parent


class ToolCall(BaseModel):
    """A tool the assistant called (nested in :class:`ChatMessage`)."""

    model_config = ConfigDict(frozen=True)
    name: str
    arguments: dict[str, Any]


class ChatMessage(BaseModel):
    """A chat agent's own entry type: the user-typed log of target 7."""

    model_config = ConfigDict(frozen=True)
    type: Literal["ChatMessage"] = "ChatMessage"
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCall] = []
    name: str | None = None


# The same files decoded by msgspec into Structs: what each load is compared with.
class _Text(msgspec.Struct, tag_field="type"):
    content: str


class _Obs(_Text, tag="Observation"):
    pass


class _Act(_Text, tag="Action"):
    pass


class _Ref(_Text, tag="Reflection"):
    pass


class _FbContent(msgspec.Struct):
    score: float
    message: str


class _Fb(msgspec.Struct, tag_field="type", tag="Feedback"):
    content: _FbContent


class _Tool(msgspec.Struct):
    name: str
    arguments: dict[str, Any]


class _Chat(msgspec.Struct, tag_field="type", tag="ChatMessage"):
    role: str
    content: str
    tool_calls: list[_Tool] = []
    name: str | None = None


_STRUCTS: dict[str, Any] = {"builtin": Union[_Obs, _Act, _Fb, _Ref], "chat": _Chat}  # noqa: UP007
_TYPES: dict[str, tuple[type, ...]] = {"builtin": (), "chat": (ChatMessage,)}


def chat_log(n_entries: int) -> MemoryLog:
    """``n_entries`` chat messages: questions, tool calls, tool results, answers."""
    log = MemoryLog(entry_types=[ChatMessage])
    for i in range(n_entries):
        k = i % 4
        if k == 0:
            log.append(ChatMessage(role="user", content=f"What is {i} * 17? Show the work."))
        elif k == 1:
            log.append(ChatMessage(role="assistant", content="", tool_calls=[ToolCall(
                name="calculator", arguments={"expression": f"{i} * 17", "precision": 2})]))
        elif k == 2:
            log.append(ChatMessage(role="tool", name="calculator", content=str(i * 17)))
        else:
            log.append(ChatMessage(role="assistant", content=f"{i} * 17 = {i * 17} ✓"))
    return log


def _child(ckpt: str, kind: str, repeats: int) -> None:
    """In a fresh interpreter: time and measure the load, time the decode (JSON out)."""
    path = next(Path(ckpt).glob("memory_*.jsonl"))
    with path.open("rb") as f:  # page cache warm, without raising the peak RSS
        while f.read(1 << 20):
            pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loads, lazy, decodes = [], [], []
    for r in range(repeats):
        t = time.perf_counter()
        loaded = load_checkpoint(ckpt, entry_types=_TYPES[kind])
        lazy.append(time.perf_counter() - t)
        entries = loaded.memory[:]
        loads.append(time.perf_counter() - t)
        if r == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            n = len(entries)
        del loaded, entries
        data = path.read_bytes()
        decoder = msgspec.json.Decoder(_STRUCTS[kind])
        t = time.perf_counter()
        structs = decoder.decode_lines(data)
        decodes.append(time.perf_counter() - t)
        assert len(structs) == n
        del structs, data
    print(json.dumps({"load_s": loads, "lazy_load_s": lazy, "decode_s": decodes, "entries": n,
                      "rss_bytes": (peak - before) * 1024,
                      "file_bytes": path.stat().st_size}))


def _measure(ckpt: Path, kind: str, repeats: int) -> dict[str, Any]:
    code = (f"from benchmarks.loading import _child; "
            f"_child({str(ckpt)!r}, {kind!r}, {repeats})")
    out = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True,
                         text=True, check=True, timeout=1800)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _write(path: Path, log: MemoryLog) -> Path:
    with SyncCheckpointWriter(path) as writer:
        writer.submit(Snapshot(1, len(log), "BenchAgent", log)).wait()
    return path / "ep_000001"


def bench_load(
    cfg: BenchConfig, base: Path, report: Report, *, pool: Sequence[Entry],
    log: Callable[[str], None] = print,
) -> None:
    """Target 7: load_checkpoint of a large memory vs msgspec, built-in and user-typed."""
    n = cfg.large_memory
    for kind, label, make in (
        ("builtin", "built-in entries", lambda: fill_memory(n, pool)),
        ("chat", "user-typed (pydantic ChatMessage)", lambda: chat_log(n)),
    ):
        log(f"  load: {n:,} {label}")
        with scratch(base, f"load-{kind}") as path:
            r = _measure(_write(path / "checkpoints", make()), kind, max(1, cfg.repeats))
        load_s, decode_s = median(r["load_s"]), median(r["decode_s"])
        lazy_s = median(r["lazy_load_s"])
        x, rss = load_s / decode_s, r["rss_bytes"] / r["file_bytes"]
        sub = "" if kind == "builtin" else ".typed"
        report.figures += [
            Figure(f"7.load{sub}", f"load_checkpoint + reading every entry, {label}, vs "
                   "msgspec decode_lines", round(x, 2), "x", "<= 2x", x <= 2.0,
                   f"{load_s:.2f} s (the lazy load alone {lazy_s:.2f} s) vs {decode_s:.2f} s, "
                   f"{r['entries']:,} entries, {r['file_bytes'] / 1e6:.0f} MB"),
            Figure(f"7.load{sub}.rss", f"peak RSS of that load and read / file size ({label})",
                   round(rss, 2), "x", "<= 3x", rss <= 3.0,
                   f"{r['rss_bytes'] / 1e6:.0f} MB over the process before the load: the "
                   "file's bytes (kept to extend it) and every entry as a pydantic object"),
        ]
        report.raw[f"load_{kind}"] = r
