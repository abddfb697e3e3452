"""``ckptwriter bench``: stall, freshness and throughput on the user's disk, at tiny size.

These check what it prints and writes, never the figures: the project's targets are
judged by the suite in ``benchmarks/`` (tests/test_benchmarks_*.py).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from ckptwriter import bench
from ckptwriter.cli import main as cli_main

MACHINE_KEYS = {"cpus", "python", "platform", "target_dir", "fs_type", "mount_point", "device",
                "clones"}
ROW_KEYS = {"memory_entries", "p50_ms", "p99_ms", "checkpoints_written"}


def test_bench_prints_machine_stall_freshness_and_throughput(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ckptwriter bench` at tiny size prints every figure, writes JSON and cleans up."""
    out, target = tmp_path / "r.json", tmp_path / "d"
    assert cli_main(["bench", "--size", "tiny", "--dir", str(target), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "sizes", "stall", "freshness", "throughput"}
    assert set(data["machine"]) == MACHINE_KEYS
    assert data["machine"]["fs_type"] != "unknown"
    for key in ("stall", "freshness"):
        assert [row["memory_entries"] for row in data[key]] == [100, 2_000]
        for row in data[key]:
            assert set(row) == ROW_KEYS
            assert 0 < row["p50_ms"] <= row["p99_ms"]
            assert row["checkpoints_written"] >= 1
    t = data["throughput"]
    assert min(t["raw_mib_s"], t["checkpoint_mib_s"], t["ratio_pct"]) > 0
    text = capsys.readouterr().out
    assert f"{data['machine']['cpus']} CPUs, {data['machine']['python']}" in text
    assert f"on {data['machine']['fs_type']} (" in text
    for heading in ("stall (time in submit()):", "freshness (submit to durable):",
                    "throughput (one full checkpoint of 2 MiB"):
        assert heading in text
    assert list(target.iterdir()) == []  # scratch dirs are cleaned up


def test_only_runs_the_named_measurement(tmp_path: Path) -> None:
    """--only limits the run and the JSON to the named measurements."""
    out = tmp_path / "r.json"
    assert cli_main(["bench", "--size", "tiny", "--only", "throughput", "--dir", str(tmp_path),
                     "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {"machine", "sizes", "throughput"}


def test_memory_entries_sets_the_large_memory(tmp_path: Path) -> None:
    """--memory-entries is the size of the large memory of the stall/freshness runs."""
    out = tmp_path / "r.json"
    cli_main(["bench", "--size", "tiny", "--only", "stall", "--memory-entries", "500",
              "--dir", str(tmp_path), "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "sizes", "stall"}
    assert [row["memory_entries"] for row in data["stall"]] == [100, 500]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--memory-entries", "0"], r"^--memory-entries must be >= 1, got 0; ",
                     id="memory-entries"),
        pytest.param(["--repeats", "0"], r"^--repeats must be >= 1, got 0$", id="repeats"),
    ],
)
def test_sizes_must_be_positive(argv: list[str], message: str) -> None:
    """A size of 0 is refused with a message naming the option."""
    with pytest.raises(SystemExit, match=message):
        cli_main(["bench", *argv])


def test_filesystem_type_finds_the_mount(tmp_path: Path) -> None:
    """The filesystem type comes from the longest mount point holding the path."""
    fs = bench.filesystem_type(tmp_path)
    mounts = Path("/proc/mounts").read_text().split("\n")
    assert any(line.split()[1:3] == [fs["mount_point"], fs["fs_type"]]
               for line in mounts if line)
    assert os.path.realpath(tmp_path).startswith(fs["mount_point"])


def test_filesystem_type_reads_mountinfo_escapes_and_overmounts(tmp_path: Path) -> None:
    """mountinfo's octal escapes are decoded; the last of two mounts on a point wins."""
    table = tmp_path / "mountinfo"
    table.write_text(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 8:2 / /mnt/my\\040disk rw shared:1 - xfs /dev/sdb1 rw\n"
        "3 2 0:5 / /mnt/my\\040disk rw - btrfs /dev/sdc1 rw\n"
    )
    assert bench.filesystem_type("/mnt/my disk/run", (str(table),)) == {
        "fs_type": "btrfs", "mount_point": "/mnt/my disk", "device": "/dev/sdc1"}
    assert bench.filesystem_type("/home", (str(table),))["fs_type"] == "ext4"


def test_filesystem_type_is_unknown_without_a_mount_table(tmp_path: Path) -> None:
    """No readable mount table (not Linux): the type is "unknown"."""
    assert bench.filesystem_type(tmp_path, (str(tmp_path / "missing"),))["fs_type"] == "unknown"


def _local_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module or "" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1}


def test_bench_imports_only_public_ckptwriter_modules() -> None:
    """The shipped benchmark uses the modules ckptwriter re-exports, never benchmarks/."""
    public = _local_imports(Path(bench.__file__).with_name("__init__.py"))
    own = {"bench", "bench_workload", "bench_plot"}  # the command's own modules
    files = [Path(bench.__file__).with_name(f"{name}.py") for name in sorted(own)]
    absolute: set[str] = set()
    for tree in (ast.parse(f.read_text()) for f in files):
        absolute |= {alias.name.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.Import) for alias in node.names}
        absolute |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
    assert {"memory", "snapshot", "writer"} <= public
    for f in files:
        assert _local_imports(f) - own - {""} <= public, f
    assert not absolute & {"benchmarks", "ckptwriter"}


def test_plot_draws_the_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--plot sweeps every interval at both memories, with and without checkpoints."""
    from ckptwriter import bench_plot

    out, png = tmp_path / "r.json", tmp_path / "cost.png"
    assert cli_main(["bench", "--size", "tiny", "--only", "throughput", "--dir", str(tmp_path),
                     "--json", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot = json.loads(out.read_text())["plot"]
    assert set(plot["disk_floor_ms"]) == {"100", "2000"}
    assert all(v > 0 for v in plot["disk_floor_ms"].values())
    settings = {(p["memory_entries"], p["interval"], p["on_backlog"]) for p in plot["points"]}
    assert settings == {(n, i, b) for n in (100, 2_000) for i, b in
                        [(1, None)] + [(i, b) for b in ("block", "coalesce")
                                       for i in bench_plot.INTERVALS]}
    assert all(p["total_s"] > 0 for p in plot["points"])
    assert f"plot: wrote {png}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["cost.txt", "cost"])
def test_plot_needs_an_image_name_before_measuring(tmp_path: Path, name: str) -> None:
    with pytest.raises(SystemExit, match=r"give a \.png, \.svg or \.pdf file name"):
        cli_main(["bench", "--size", "tiny", "--dir", str(tmp_path), "--plot",
                  str(tmp_path / name)])
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if missing
    with pytest.raises(SystemExit, match=r"pip install 'ckptwriter\[plot\]'"):
        cli_main(["bench", "--size", "tiny", "--dir", str(tmp_path), "--plot",
                  str(tmp_path / "x.png")])
