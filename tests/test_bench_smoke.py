"""Every benchmark runs at a tiny size, so none of them rots.

These tests check the structure of the output and the JSON, never the targets: the
targets are judged by ``make bench`` on a real machine, not by unit tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckptwriter import bench

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"1", "2", "3", "4", "5", "6"}
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
            "encode"} <= set(data["raw"])


def test_cli_bench_runs_every_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ckptwriter bench` at tiny size prints the machine and table and writes JSON."""
    out = tmp_path / "r.json"
    rc = bench.main(["--size", "tiny", "--dir", str(tmp_path / "d"), "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    _check_results(data)
    text = capsys.readouterr().out
    assert "ckptwriter benchmarks" in text
    assert f"on {data['machine']['fs_type']}" in text
    assert list((tmp_path / "d").iterdir()) == []  # scratch dirs are cleaned up


def test_suite_runs_every_benchmark_with_baselines(tmp_path: Path) -> None:
    """`python -m benchmarks` at tiny size adds the baselines beside the figures."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "tiny", "--dir", str(tmp_path),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    _check_results(data)
    ids = {f["id"] for f in data["figures"]}
    assert {"2.baseline.naive sync writer (json + fsync in the loop)",
            "2.baseline.thread rewriting the whole memory"} <= ids
    assert all(o["written"][0] >= 1 for o in data["raw"]["gil_options"].values())
    assert f"results: {out}" in proc.stdout


def test_strict_exits_1_when_a_target_is_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--strict turns a missed target into exit status 1."""
    def fake_suite(cfg: bench.BenchConfig, target_dir: Any, **_: Any) -> bench.Report:
        report = bench.Report(machine=bench.machine_info(target_dir), config={})
        report.machine["loadavg_end"] = [0.0]
        report.figures.append(bench.Figure("2.x", "x", 5.0, "%", "<= 3 %", False))
        return report

    monkeypatch.setattr(bench, "run_suite", fake_suite)
    args = ["--size", "tiny", "--dir", str(tmp_path)]
    assert bench.main(args) == 0
    assert bench.main([*args, "--strict"]) == 1


def test_only_runs_the_named_benchmark(tmp_path: Path) -> None:
    """--only limits the run to the named benchmarks."""
    out = tmp_path / "r.json"
    bench.main(["--size", "tiny", "--only", "encode", "--dir", str(tmp_path),
                "--json", str(out)])
    ids = {f["id"].split(".")[0] for f in json.loads(out.read_text())["figures"]}
    assert ids == {"5"}


def test_markdown_table_has_a_row_per_figure(tmp_path: Path) -> None:
    """--markdown writes the machine line and one table row per figure."""
    out, md = tmp_path / "r.json", tmp_path / "t.md"
    bench.main(["--size", "tiny", "--only", "encode", "--dir", str(tmp_path),
                "--json", str(out), "--markdown", str(md)])
    rows = [ln for ln in md.read_text().splitlines() if ln.startswith("| 5 |")]
    assert md.read_text().startswith("Machine: ")
    assert len(rows) == len(json.loads(out.read_text())["figures"])


def test_memory_entries_must_be_positive() -> None:
    """--memory-entries 0 is refused with a message naming the option."""
    with pytest.raises(SystemExit, match=r"^--memory-entries must be >= 1, got 0; "):
        bench.main(["--memory-entries", "0"])


def test_filesystem_of_finds_the_mount(tmp_path: Path) -> None:
    """The filesystem type comes from the longest mount point holding the path."""
    fs = bench.filesystem_of(tmp_path)
    mounts = Path("/proc/mounts").read_text().split("\n")
    assert any(line.split()[1:3] == [fs["mount_point"], fs["fs_type"]]
               for line in mounts if line)
    assert os.path.realpath(tmp_path).startswith(fs["mount_point"])


@pytest.mark.parametrize(
    ("q", "expected"),
    [pytest.param(50, 50.0, id="p50"), pytest.param(99, 99.0, id="p99"),
     pytest.param(100, 100.0, id="max"), pytest.param(0, 1.0, id="min")],
)
def test_percentile_is_nearest_rank(q: float, expected: float) -> None:
    """percentile() is the nearest-rank percentile of the samples."""
    assert bench.percentile([float(i) for i in range(100, 0, -1)], q) == expected
