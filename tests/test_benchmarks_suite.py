"""The benchmark suite (``python -m benchmarks``) runs every benchmark at a tiny size.

These tests check the structure of the output and the JSON, never the targets: the
targets are judged by ``make bench`` on a real machine, not by unit tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmarks import suite
from benchmarks.machine import machine_info
from benchmarks.report import Figure, Report
from benchmarks.sizes import BenchConfig

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"1", "2", "3", "4", "5", "6", "7", "8", "9"}
FIGURE_KEYS = {"id", "name", "value", "unit", "target", "passed", "note", "verdict"}
MACHINE_KEYS = {"cores", "usable_cores", "python", "kernel", "fs_type", "mount_point",
                "target_dir", "loadavg_start", "loadavg_end"}


def _check_results(data: dict[str, Any]) -> None:
    assert data["errors"] == {}
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["config"]["repeats"] == 1
    assert data["seconds"] > 0
    for fig in data["figures"]:
        assert set(fig) == FIGURE_KEYS
        assert fig["verdict"] in {"PASS", "MISS", "info"}
        assert (fig["passed"] is None) == (fig["verdict"] == "info")
        assert isinstance(fig["value"], (int, float))
    assert {f["id"].split(".")[0] for f in data["figures"] if f["passed"] is not None} == TARGETS
    assert {"overhead", "stall_freshness", "gil_options", "throughput", "incremental",
            "encode", "load_builtin", "load_chat", "floor"} <= set(data["raw"])


def test_suite_runs_every_benchmark_with_baselines(tmp_path: Path) -> None:
    """`python -m benchmarks` at tiny size prints the machine and table, adds the
    baselines beside the figures, writes JSON and cleans its scratch directories."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "tiny", "--dir", str(tmp_path / "d"),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    _check_results(data)
    ids = {f["id"] for f in data["figures"]}
    assert {"2.baseline.naive sync writer (json + fsync in the loop)",
            "2.baseline.thread rewriting the whole memory"} <= ids
    assert all(o["written"][0] >= 1 for o in data["raw"]["gil_options"].values())
    assert "ckptwriter benchmarks" in proc.stdout
    assert f"on {data['machine']['fs_type']}" in proc.stdout
    assert f"results: {out}" in proc.stdout
    assert list((tmp_path / "d").iterdir()) == []  # scratch dirs are cleaned up


def test_strict_exits_1_when_a_target_is_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--strict turns a missed target into exit status 1."""
    def fake_suite(cfg: BenchConfig, target_dir: Any, **_: Any) -> Report:
        report = Report(machine=machine_info(target_dir), config={})
        report.machine["loadavg_end"] = [0.0]
        report.figures.append(Figure("2.x", "x", 5.0, "%", "<= 3 %", False))
        return report

    monkeypatch.setattr(suite, "run_suite", fake_suite)
    args = ["--size", "tiny", "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")]
    assert suite.main(args) == 0
    assert suite.main([*args, "--strict"]) == 1


def test_only_runs_the_named_benchmark(tmp_path: Path) -> None:
    """--only limits the run to the named benchmarks."""
    out = tmp_path / "r.json"
    suite.main(["--size", "tiny", "--only", "encode", "--dir", str(tmp_path),
                "--json", str(out)])
    ids = {f["id"].split(".")[0] for f in json.loads(out.read_text())["figures"]}
    assert ids == {"5"}


def test_memory_entries_must_be_positive() -> None:
    """--memory-entries 0 is refused with a message naming the option."""
    with pytest.raises(SystemExit, match=r"^--memory-entries must be >= 1, got 0; "):
        suite.main(["--memory-entries", "0"])


def test_benchmarks_import_only_ckptwriter_public_api() -> None:
    """The suite imports ckptwriter's top-level package only, never a private module.

    Besides it, ``ckptwriter.bench``: the shipped bench command, whose machine facts
    (filesystem, reflink) the suite reports the same way instead of keeping a copy.
    """
    for path in (REPO / "benchmarks").glob("*.py"):
        for line in path.read_text().splitlines():
            if line.lstrip().startswith(("from ckptwriter", "import ckptwriter")):
                assert line.split()[1] in ("ckptwriter", "ckptwriter.bench"), \
                    f"{path.name}: {line.strip()}"
