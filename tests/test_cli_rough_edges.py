"""The command line as a new user meets it: --version, help, ls defaults and pointers,
du's disk use, "Checkpoint not found" hints, the progress bar's queue, one log format."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from _runtime_util import cli, config, train, write_config
from ckptwriter import __version__, bench
from ckptwriter.cli import _parser
from ckptwriter.runtime import RichReporter, TrainResult, TrainStatus
from ckptwriter.runtime.inspection import disk_usage, format_size
from ckptwriter.runtime.progress import log_formatter


def _ckpts(result: TrainResult) -> Path:
    assert result.checkpoint_dir is not None
    return result.checkpoint_dir


def _run(tmp_path: Path, name: str = "my_run", **runtime: object) -> TrainResult:
    runtime.setdefault("max_envs_to_visit", 30)
    runtime.setdefault("checkpoint_every_episodes", 10)
    return train(config(tmp_path, name, **runtime))


# -- --version, help, ls -------------------------------------------------------------


def test_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ckptwriter --version` prints the version and exits 0."""
    assert cli(["--version"], tmp_path) == 0
    assert capsys.readouterr().out.strip() == f"ckptwriter {__version__}"


def _actions(parser: argparse.ArgumentParser, prog: str) -> list[tuple[str, argparse.Action]]:
    found: list[tuple[str, argparse.Action]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _actions(sub, f"{prog} {name}")
        found.append((prog, action))
    return found


@pytest.mark.parametrize("parser", [
    pytest.param(_parser(), id="ckptwriter"),
    pytest.param(bench._parser(), id="bench"),
])
def test_every_argument_has_help(parser: argparse.ArgumentParser) -> None:
    """Every argument of every subcommand says what it is for in --help."""
    missing = [f"{prog}: {a.dest}" for prog, a in _actions(parser, parser.prog)
               if not a.help and a.help is not argparse.SUPPRESS]
    assert missing == []


def test_ls_without_a_path_lists_outputs(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`ckptwriter ls` lists ./outputs, where `train` writes by default."""
    cfg = write_config(tmp_path, "quick", "runtime:\n  executor: thread\n"
                       "  max_envs_to_visit: 20\n  checkpoint_every_episodes: 10\n")
    assert cli(["train", "--config", str(cfg), "--quiet"], tmp_path) == 0
    capsys.readouterr()
    assert cli(["ls"], tmp_path) == 0
    out = capsys.readouterr().out
    assert "outputs/quick/" in out
    assert sum("ep_0000" in ln for ln in out.splitlines()) == 2


@pytest.mark.parametrize("how", ["symlink", "json"])
def test_ls_marks_best(tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    """A `best` symlink (or best.json alone) is marked in ls as latest is."""
    ck = _ckpts(_run(tmp_path))
    if how == "symlink":
        (ck / "best").symlink_to("ep_000010")
    else:
        pointer = json.loads((ck / "latest.json").read_text())
        pointer.update(checkpoint="ep_000010", episode_index=10)
        (ck / "best.json").write_text(json.dumps(pointer))
    assert cli(["ls", str(ck)], tmp_path) == 0
    rows = {ln.split()[1]: ln for ln in capsys.readouterr().out.splitlines() if "ep_0" in ln}
    assert "<- best" in rows["ep_000010"]
    assert "<- latest" in rows["ep_000030"]
    assert "best" not in rows["ep_000020"] + rows["ep_000030"]


def test_ls_marks_a_checkpoint_both_latest_and_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One checkpoint that is latest and best shows both."""
    ck = _ckpts(_run(tmp_path))
    (ck / "best").symlink_to("ep_000030")
    assert cli(["ls", str(ck)], tmp_path) == 0
    [row] = [ln for ln in capsys.readouterr().out.splitlines() if "ep_000030" in ln]
    assert "<- latest, best" in row


# -- du ------------------------------------------------------------------------------


def _du_k(path: Path) -> int:
    out = subprocess.run(["du", "-sk", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return int(out.split()[0])


def _run_total(out: str, run_dir: Path) -> str:
    [line] = [ln for ln in out.splitlines() if ln.endswith(f"{run_dir}  (run total)")]
    return line.split(f"  {run_dir}")[0].strip()


def test_du_reports_disk_use_as_du_does(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """du's run total is the disk use `du -sk` measures (blocks, not file sizes)."""
    run = _run(tmp_path)
    assert disk_usage(run.run_dir) == _du_k(run.run_dir) * 1024
    assert cli(["du", str(run.run_dir)], tmp_path) == 0
    assert _run_total(capsys.readouterr().out, run.run_dir) == format_size(
        _du_k(run.run_dir) * 1024)


def test_du_counts_a_hard_linked_file_once(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A file hard-linked twice in a run (and once into a second run) counts once."""
    a, b = _run(tmp_path), _run(tmp_path)
    big = a.run_dir / "weights.bin"
    big.write_bytes(os.urandom(2 * 2**20))
    os.link(big, a.run_dir / "weights_again.bin")
    os.link(big, b.run_dir / "weights.bin")
    assert disk_usage(a.run_dir) == _du_k(a.run_dir) * 1024
    assert cli(["du", "outputs/my_run"], tmp_path) == 0
    out = capsys.readouterr().out
    assert _run_total(out, a.run_dir.relative_to(tmp_path)) == format_size(_du_k(a.run_dir) * 1024)
    # `du -sk A B` counts an inode in the first argument only, as the grand total must.
    both = subprocess.run(["du", "-sk", str(a.run_dir), str(b.run_dir)], check=True,
                          capture_output=True, text=True).stdout
    du_total = sum(int(ln.split()[0]) for ln in both.splitlines()) * 1024
    [total] = [ln for ln in out.splitlines() if ln.endswith("  total")]
    assert total.split("  total")[0].strip() == format_size(du_total)
    assert du_total < 3 * 2**20  # the 2 MiB file counted once


# -- "Checkpoint not found" ----------------------------------------------------------


def test_bare_relative_path_lists_checkpoints_nearby(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped relative path in the project directory lists ./outputs' checkpoints."""
    ck = _ckpts(_run(tmp_path, max_envs_to_visit=10))
    assert cli(["show", "ep_000010"], tmp_path) == 1
    err = capsys.readouterr().err
    assert "Checkpoints that do exist nearby:" in err
    assert f"  {ck.relative_to(tmp_path)}/ep_000010" in err.splitlines()
    assert "No checkpoints exist nearby" not in err


def test_missing_run_name_lists_the_runs(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """resume_from: outputs/<typo> names the runs there, not other runs' checkpoints."""
    _run(tmp_path, "alpha", max_envs_to_visit=10)
    _run(tmp_path, "beta", max_envs_to_visit=10)
    cfg = write_config(tmp_path, "gamma", "runtime:\n  executor: thread\n"
                       "  resume_from: outputs/alpah\n")
    assert cli(["train", "--config", str(cfg)], tmp_path) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-2:] == [
        "error: Checkpoint not found: outputs/alpah",
        "There is no run 'alpah' in outputs; the runs there are: alpha, beta "
        "(`ckptwriter ls outputs` lists their checkpoints).",
    ]


def test_ls_of_a_missing_path_does_not_advise_ls(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`ckptwriter ls nonexist` says what is wrong, never "run `ckptwriter ls`"."""
    assert cli(["ls", "nonexist"], tmp_path) == 1
    err = capsys.readouterr().err
    assert err == ("error: Checkpoint not found: nonexist\n"
                   "The path does not exist or is not a directory.\n"
                   "No checkpoints exist nearby either.\n")


@pytest.mark.parametrize("command", ["verify", "ls"])
def test_an_empty_checkpoints_directory_says_so_and_looks_nearby(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A checkpoints directory a writer opened and never committed to (a run killed in
    its first checkpoint) is named as such, and the checkpoints beside it are listed:
    the search is done, never only claimed (found by a new-user trial)."""
    ck = _ckpts(_run(tmp_path, "alpha", max_envs_to_visit=10))
    empty = tmp_path / "outputs" / "killed" / "checkpoints"
    empty.mkdir(parents=True)
    (empty / ".lock").write_text("")
    assert cli([command, str(empty)], tmp_path) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[:3] == [
        f"error: Checkpoint not found: {empty}",
        "It is a checkpoints directory a writer has opened (it holds .lock), with no "
        "checkpoint committed yet.",
        "Checkpoints that do exist nearby:",
    ]
    assert f"  {ck}/ep_000010" in err.splitlines()
    assert "No checkpoints exist nearby" not in err


def test_a_search_nearby_that_is_refused_still_says_not_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing above the path refused (object-storage credentials scoped to one
    prefix, say): still "not found" with what the path is, never the listing's error,
    and nothing claimed about what is nearby."""
    from ckptwriter import discovery
    from ckptwriter.errors import StorageError

    def refused(*args: object, **kw: object) -> list[str]:
        raise StorageError("Access Denied listing the parent: check the credentials")

    monkeypatch.setattr(discovery, "nearby", refused)
    empty = tmp_path / "killed" / "checkpoints"
    empty.mkdir(parents=True)
    (empty / ".lock").write_text("")
    assert cli(["verify", str(empty)], tmp_path) == 1
    assert capsys.readouterr().err == (
        f"error: Checkpoint not found: {empty}\n"
        "It is a checkpoints directory a writer has opened (it holds .lock), with no "
        "checkpoint committed yet.\n")


# -- progress bar and log lines ------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[TrainStatus] = []

    def update(self, status: TrainStatus) -> None:
        self.seen.append(status)


def test_progress_queue_never_exceeds_max_pending(tmp_path: Path) -> None:
    """Checkpointing every episode with max_pending 1: the bar shows at most 1 queued."""
    import anyio

    from ckptwriter.runtime import run_training

    cfg = config(tmp_path, "busy", max_envs_to_visit=300, checkpoint_every_episodes=1,
                 checkpoint_keep_last=2, max_pending=1)
    rec = _Recorder()
    anyio.run(lambda: run_training(cfg, reporter=rec))
    assert rec.seen
    assert all(s.max_pending == 1 and s.queued <= 1 and s.writing <= 1 for s in rec.seen)


def test_log_lines_have_one_format_on_a_terminal_and_in_a_pipe() -> None:
    """The bar's log handler prints the same line as the plain stderr handler."""
    record = logging.LogRecord("ckptwriter.runtime", logging.INFO, __file__, 1,
                               "Checkpoint %s saved", ("ep_000010",), None)
    buf = io.StringIO()
    bar = RichReporter(Console(file=buf, force_terminal=True, width=60))
    bar.log_handler.handle(record)
    plain = log_formatter().format(record)
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO Checkpoint ep_000010 saved", plain)
    assert buf.getvalue() == plain + "\n"


@pytest.mark.parametrize("inside", [True, False], ids=["under-cwd", "outside-cwd"])
def test_log_paths_have_one_style(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  inside: bool) -> None:
    """Every path the run prints is relative under the working directory, else absolute."""
    work = tmp_path / "project"
    work.mkdir()
    out_dir = "outputs" if inside else str(tmp_path / "elsewhere")
    cfg = write_config(work, "paths", f"output_dir: {out_dir}\nruntime:\n  executor: thread\n"
                       "  max_envs_to_visit: 20\n  checkpoint_every_episodes: 10\n")
    assert cli(["train", "--config", str(cfg)], work) == 0
    out, err = capsys.readouterr()
    lines = [ln for ln in (err + out).splitlines() if "paths/" in ln]
    assert len(lines) >= 4  # run directory, 2 checkpoints, summary
    for ln in lines:
        assert (str(tmp_path) in ln) is not inside, ln


# -- messages that name the user's key or file ---------------------------------------


@pytest.mark.parametrize(("yaml_text", "key"), [
    pytest.param("runtime: 5\n", "runtime", id="runtime"),
    pytest.param("environment: hello\n", "environment", id="environment"),
    pytest.param("agent:\n  config: [1]\n", "agent.config", id="agent-config"),
])
def test_section_of_the_wrong_type_names_the_key_not_the_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str, key: str
) -> None:
    """`runtime: 5` says the section must be a mapping, never "instance of RuntimeConfig"."""
    cfg = write_config(tmp_path, "typo", yaml_text)
    assert cli(["train", "--config", str(cfg)], tmp_path) == 2
    err = capsys.readouterr().err
    section = key.rsplit(".", 1)[-1]
    assert err.startswith(f"error: {cfg}: {key}: expected a mapping of settings "
                          f"(`{section}:` then `key: value` lines indented under it)")
    assert "instance of" not in err
    assert "Config" not in err


def test_extra_file_with_non_str_keys_names_the_file(tmp_path: Path) -> None:
    """extra_files with an int key names the file and the fix, not msgspec's `order`."""
    import anyio

    from ckptwriter import CheckpointError, CheckpointWriter, MemoryLog, Snapshot

    async def submit() -> None:
        async with CheckpointWriter(tmp_path / "ck", executor="thread") as writer:
            await writer.submit(Snapshot(episode_index=1, train_steps_total=1, agent_type="a",
                                         memory=MemoryLog(),
                                         extra_files={"optimizer.json": {1: 0.5}}))

    with pytest.raises(CheckpointError, match=(
        r"^extra_files\['optimizer\.json'\] has the key 1 \(int\): JSON keys are strings, it "
        r"would load back as '1'; convert keys with str\(key\); make it JSON data")):
        anyio.run(submit)


def test_log_lines_tell_one_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint line never claims an episode earlier than a line printed before it.

    Saves are logged when durable; one that finished after later episodes says "durable by
    episode M", and no line before it is about an episode after M.
    """
    cfg = write_config(tmp_path, "order", "runtime:\n  executor: thread\n"
                       "  max_envs_to_visit: 60\n  checkpoint_every_episodes: 5\n"
                       "  checkpoint_keep_last: 2\n  validation_freq: 1\n")
    assert cli(["train", "--config", str(cfg)], tmp_path) == 0
    floor, saves = 0, 0
    for line in capsys.readouterr().err.splitlines():
        if m := re.search(r"Validation at episode (\d+)", line):
            assert int(m[1]) >= floor, line
            floor = int(m[1])
        elif m := re.search(r"Checkpoint ep_(\d+) saved(?: \(durable by episode (\d+)\))?:", line):
            saves += 1
            now = int(m[2] or m[1])
            assert now >= floor, line
            assert now >= int(m[1]), line
            floor = now
    assert saves == 12


def test_log_paths_keep_urls_whole() -> None:
    """An object-storage location is printed as given, never as a mangled local path."""
    from ckptwriter.runtime.progress import display_path

    assert display_path("s3://bucket/run/checkpoints/ep_000001") == \
        "s3://bucket/run/checkpoints/ep_000001"
    assert display_path("memory://ckpts/ep_000002") == "memory://ckpts/ep_000002"
