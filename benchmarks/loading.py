"""Target 7: loading a large memory back, against msgspec decoding the same file.

7. ``load_checkpoint`` of a ``large_memory``-entry memory within 2x the time msgspec
   ``decode_lines`` takes to decode the same file into Structs, in the same process, and
   the load's peak RSS within 3x the file's size; for the built-in entry types and for
   user-typed logs (pydantic chat messages with nested tool calls, and the same as a
   msgspec Struct).

The load checks every line (msgspec decodes each into a mirror Struct of its type, in
C: the work of the decode it is compared with) and keeps the file's bytes; entry objects
are built when they are read. So beside the judged load, two informative rows: the load
and reading every entry once (iterating, as an agent reads its memory), and the load
with every entry held at once (``memory[:]``), with their peak RSS.

Each kind runs in a fresh interpreter. Peak RSS is the kernel's high-water mark
(``VmHWM``), reset before each measured step (``/proc/self/clear_refs``) and taken over
the RSS at that moment: ``ru_maxrss`` would start at the parent's RSS, inherited
through exec. The decode is timed at its fastest: the file already in memory (the
load reads it and checks its sha256 too), garbage collection paused (with it on, the
collector walks the growing list of Structs again and again: several times slower for
Structs holding lists and dicts), alternating with the loads.
"""

from __future__ import annotations

import gc
import json
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

__all__ = ["ChatMessage", "ChatStruct", "ToolCall", "ToolCallStruct", "bench_load",
           "chat_log"]

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


class ToolCallStruct(msgspec.Struct, frozen=True):
    """:class:`ToolCall` as a msgspec Struct."""

    name: str
    arguments: dict[str, Any]


class ChatStruct(msgspec.Struct, frozen=True, tag_field="type", tag="ChatStruct"):
    """:class:`ChatMessage` as a msgspec Struct: the third kind of target 7."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCallStruct] = []
    name: str | None = None


class _ChatS(msgspec.Struct, tag_field="type", tag="ChatStruct"):
    role: str
    content: str
    tool_calls: list[_Tool] = []
    name: str | None = None


_STRUCTS: dict[str, Any] = {"builtin": Union[_Obs, _Act, _Fb, _Ref],  # noqa: UP007
                            "chat": _Chat, "struct": _ChatS}
_TYPES: dict[str, tuple[type, ...]] = {"builtin": (), "chat": (ChatMessage,),
                                       "struct": (ChatStruct,)}


def chat_log(n_entries: int, *, struct: bool = False) -> MemoryLog:
    """``n_entries`` chat messages: questions, tool calls, tool results, answers."""
    msg: Any = ChatStruct if struct else ChatMessage
    tool: Any = ToolCallStruct if struct else ToolCall
    log = MemoryLog(entry_types=[msg])
    for i in range(n_entries):
        k = i % 4
        if k == 0:
            log.append(msg(role="user", content=f"What is {i} * 17? Show the work."))
        elif k == 1:
            log.append(msg(role="assistant", content="", tool_calls=[tool(
                name="calculator", arguments={"expression": f"{i} * 17", "precision": 2})]))
        elif k == 2:
            log.append(msg(role="tool", name="calculator", content=str(i * 17)))
        else:
            log.append(msg(role="assistant", content=f"{i} * 17 = {i * 17} ✓"))
    return log


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> int:
    """Reset the RSS high-water mark to the RSS now; return the RSS now."""
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _status("VmRSS:")


def _child(ckpt: str, kind: str, repeats: int) -> None:
    """In a fresh interpreter: time and measure the loads and the decode (JSON out)."""
    path = next(Path(ckpt).glob("memory_*.jsonl"))
    with path.open("rb") as f:  # page cache warm, without raising the peak RSS
        while f.read(1 << 20):
            pass
    types, decoder = _TYPES[kind], msgspec.json.Decoder(_STRUCTS[kind])
    out: dict[str, Any] = {k: [] for k in ("load_s", "read_s", "all_s", "decode_s", "load_cpu",
                                           "read_cpu", "all_cpu", "decode_cpu")}
    cpu = time.process_time
    for _ in range(repeats):
        # The load, then reading every entry once, as an agent reads its memory.
        base = _reset_peak()
        t, c = time.perf_counter(), cpu()
        loaded = load_checkpoint(ckpt, entry_types=types)
        out["load_s"].append(time.perf_counter() - t)
        out["load_cpu"].append(cpu() - c)
        out["load_rss"] = _status("VmHWM:") - base
        n = 0
        for _entry in loaded.memory:
            n += 1
        out["read_s"].append(time.perf_counter() - t)
        out["read_cpu"].append(cpu() - c)
        out["read_rss"] = _status("VmHWM:") - base
        del loaded
        # The load, and every entry held at once.
        base = _reset_peak()
        t, c = time.perf_counter(), cpu()
        entries = load_checkpoint(ckpt, entry_types=types).memory[:]
        out["all_s"].append(time.perf_counter() - t)
        out["all_cpu"].append(cpu() - c)
        out["all_rss"] = _status("VmHWM:") - base
        assert len(entries) == n
        del entries
        # The decode it is compared with.
        base = _reset_peak()
        data = path.read_bytes()
        gc.disable()  # as the load pauses it while it builds objects: the faster decode
        t, c = time.perf_counter(), cpu()
        structs = decoder.decode_lines(data)
        out["decode_s"].append(time.perf_counter() - t)
        out["decode_cpu"].append(cpu() - c)
        gc.enable()
        out["decode_rss"] = _status("VmHWM:") - base
        assert len(structs) == n
        del structs, data
    out.update(entries=n, file_bytes=path.stat().st_size)
    print(json.dumps(out))


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


def _cpu(r: dict[str, Any], key: str) -> str:
    """The CPU-time ratio beside a wall-time one (steadier on a busy machine)."""
    c, d = median(r[f"{key}_cpu"]), median(r["decode_cpu"])
    return f"CPU {c:.2f} s vs {d:.2f} s ({c / d:.2f}x)"


def _figures(kind: str, label: str, r: dict[str, Any]) -> list[Figure]:
    decode_s, size = median(r["decode_s"]), r["file_bytes"]
    x = median(r["load_s"]) / decode_s
    rss = r["load_rss"] / size
    sub = {"builtin": "", "chat": ".typed", "struct": ".struct"}[kind]
    mb = f"{r['entries']:,} entries, {size / 1e6:.0f} MB"

    def info(what: str, key: str) -> Figure:
        t, peak = median(r[f"{key}_s"]), r[f"{key}_rss"]
        return Figure(f"7.load{sub}.{key}", f"load_checkpoint and {what} ({label}), vs "
                      "msgspec decode_lines", round(t / decode_s, 2), "x", "", None,
                      f"{t:.2f} s vs {decode_s:.2f} s, {_cpu(r, key)}; peak RSS "
                      f"{peak / 1e6:.0f} MB, {peak / size:.2f}x the file (msgspec: the "
                      f"file's bytes and its Structs, {r['decode_rss'] / size:.2f}x)")

    return [
        Figure(f"7.load{sub}", f"load_checkpoint, every line checked ({label}), vs msgspec "
               "decode_lines", round(x, 2), "x", "<= 2x", x <= 2.0,
               f"{median(r['load_s']):.2f} s vs {decode_s:.2f} s, {_cpu(r, 'load')}, "
               f"{mb}; the load reads the file and checks its sha256 too; entries are "
               "built when read (rows .read, .all)"),
        Figure(f"7.load{sub}.rss", f"peak RSS of that load / file size ({label})",
               round(rss, 2), "x", "<= 3x", rss <= 3.0,
               f"{r['load_rss'] / 1e6:.0f} MB over the RSS before the load (VmHWM): the "
               "file's bytes, kept to extend it byte for byte, and the index"),
        info("reading every entry once", "read"),
        info("holding every entry at once (memory[:])", "all"),
    ]


def bench_load(
    cfg: BenchConfig, base: Path, report: Report, *, pool: Sequence[Entry],
    log: Callable[[str], None] = print,
) -> None:
    """Target 7: load_checkpoint of a large memory vs msgspec, built-in and user-typed."""
    n = cfg.large_memory
    for kind, label, make in (
        ("builtin", "built-in entries", lambda: fill_memory(n, pool)),
        ("chat", "user-typed: pydantic ChatMessage", lambda: chat_log(n)),
        ("struct", "user-typed: msgspec Struct ChatStruct", lambda: chat_log(n, struct=True)),
    ):
        log(f"  load: {n:,} {label}")
        with scratch(base, f"load-{kind}") as path:
            r = _measure(_write(path / "checkpoints", make()), kind, max(1, cfg.repeats))
        report.figures += _figures(kind, label, r)
        report.raw[f"load_{kind}"] = r
