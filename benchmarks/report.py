"""Figures and their verdicts, and a run's report as a table, Markdown or JSON."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Figure", "Report", "format_markdown", "print_report", "write_json"]


@dataclass(frozen=True)
class Figure:
    """One measured figure, its target and whether it was met (``None``: informative)."""

    id: str
    name: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        """``PASS``, ``MISS`` or ``info``."""
        return "info" if self.passed is None else ("PASS" if self.passed else "MISS")


@dataclass
class Report:
    """A whole run: the machine, the sizes, the figures and the raw samples."""

    machine: dict[str, Any]
    config: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    started: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Everything as plain JSON types."""
        return {
            "started": self.started,
            "seconds": round(self.seconds, 2),
            "machine": self.machine,
            "config": self.config,
            "figures": [{**asdict(f), "verdict": f.verdict} for f in self.figures],
            "raw": self.raw,
            "errors": self.errors,
        }


def print_report(report: Report, console: Any = None) -> None:
    """The machine and a table of figure, value, target and verdict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # A pipe or a log file gets a table wide enough to read, not rich's 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 180)
    m = report.machine
    console.print(
        f"[bold]machine[/]: {m['cores']} cores ({m['usable_cores']} usable), {m['python']}, "
        f"{m['kernel']}, {m['machine']}\n[bold]target dir[/]: {m['target_dir']} on "
        f"{m['fs_type']} ({m['device']} at {m['mount_point']}; {_clones(m)})\n"
        f"[bold]load average[/]: "
        f"{m['loadavg_start']} at start, {m.get('loadavg_end', '?')} at end; "
        f"{report.seconds:.0f} s"
    )
    table = Table(title="ckptwriter benchmarks")
    for col in ("target #", "figure", "value", "target", "result", "note"):
        table.add_column(col, overflow="fold")
    style = {"PASS": "green", "MISS": "bold red", "info": "dim"}
    for f in report.figures:
        table.add_row(f.id.split(".")[0], escape(f.name), f"{f.value:.4g} {f.unit}",
                      escape(f.target), f"[{style[f.verdict]}]{f.verdict}[/]", escape(f.note))
    console.print(table)
    for name, err in report.errors.items():
        console.print(f"[bold red]benchmark {name} failed[/]: {escape(err)}")


def _clones(machine: dict[str, Any]) -> str:
    if "clones" not in machine:
        return "reflink not checked"
    return "clones files (reflink)" if machine["clones"] else "no reflink"


def format_markdown(report: Report) -> str:
    """The machine line and the table as Markdown (for docs/PERFORMANCE.md, README)."""
    m = report.machine
    lines = [
        f"Machine: {m['cores']} cores, {m['python']}, {m['kernel']}; target dir on "
        f"{m['fs_type']} ({_clones(m)}); load average {m['loadavg_start'][0]} at start, "
        f"{m.get('loadavg_end', ['?'])[0]} at end; run {report.started}, {report.seconds:.0f} s.",
        "",
        "| # | figure | value | target | result | note |",
        "|---|---|---|---|---|---|",
    ]
    for f in report.figures:
        cells = [f.id.split(".")[0], f.name, f"{f.value:.4g} {f.unit}", f.target,
                 f"**{f.verdict}**" if f.verdict == "MISS" else f.verdict, f.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(report: Report, path: str | os.PathLike[str]) -> None:
    """Write the report as indented JSON (parent directories created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
