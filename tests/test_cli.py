"""The command line: train, ls, show, verify, du, bench, progress, signals."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import pytest
from rich.console import Console

from _runtime_util import cli, config, train, write_config
from ckptwriter import load_checkpoint
from ckptwriter.runtime import RichReporter, TrainResult, TrainStatus
from ckptwriter.runtime.inspection import format_age, format_size
from ckptwriter.runtime.progress import progress_enabled


def _run(tmp_path: Path, name: str = "my_run", episodes: int = 200, every: int = 100,
         **runtime: object) -> TrainResult:
    return train(config(tmp_path, name, max_envs_to_visit=episodes,
                        checkpoint_every_episodes=every, **runtime))


def _ckpts(result: TrainResult) -> Path:
    assert result.checkpoint_dir is not None
    return result.checkpoint_dir


# -- train ---------------------------------------------------------------------------


def test_train_prints_where_checkpoints_are(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """train exits 0 and prints the checkpoints directory and latest on stdout."""
    cfg = write_config(tmp_path, "quick", "runtime:\n  checkpoint_every_episodes: 50\n")
    assert cli(["train", "--config", str(cfg), "--set", "runtime.executor=thread"],
               tmp_path) == 0
    out, err = capsys.readouterr()
    (run,) = (tmp_path / "outputs" / "quick").iterdir()
    assert f"Checkpoints are in outputs/quick/{run.name}/checkpoints (latest -> ep_000100)" in out
    assert "Finished at episode 100/100" in out
    assert "Traceback" not in err


def test_train_logs_one_line_per_checkpoint_and_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stderr gets one line per checkpoint and per validation, and no progress bar."""
    cfg = write_config(tmp_path, "logs", "runtime:\n  checkpoint_every_episodes: 50\n"
                       "  validation_freq: 25\n  executor: thread\n")
    assert cli(["train", "--config", str(cfg)], tmp_path) == 0
    err = capsys.readouterr().err
    assert sum("Checkpoint ep_" in ln for ln in err.splitlines()) == 2
    assert sum("Validation at episode" in ln for ln in err.splitlines()) == 4
    assert "episode 100/100" not in err


def test_train_quiet_hides_info_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--quiet keeps stderr free of per-checkpoint lines."""
    cfg = write_config(tmp_path, "q", "runtime:\n  executor: thread\n"
                       "  checkpoint_every_episodes: 50\n")
    assert cli(["train", "--config", str(cfg), "--quiet"], tmp_path) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "Checkpoints are in" in out


def test_config_error_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config error is one message on stderr and exit code 2."""
    cfg = write_config(tmp_path, "bad", "runtime:\n  checkpoint_keep_lst: 5\n")
    assert cli(["train", "--config", str(cfg)], tmp_path) == 2
    err = capsys.readouterr().err
    assert err == (f"error: Unknown key 'runtime.checkpoint_keep_lst' in {cfg}; "
                   "did you mean checkpoint_keep_last?\n")


def test_resume_not_found_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing resume_from is "Checkpoint not found: PATH" and exit code 1."""
    cfg = write_config(tmp_path, "r", 'runtime:\n  resume_from: "outputs/x/1/checkpoints/latest"\n')
    assert cli(["train", "--config", str(cfg)], tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Checkpoint not found: outputs/x/1/checkpoints/latest\n")
    assert "Traceback" not in err


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Missing --config is a usage error with exit code 2."""
    assert cli(["train"], tmp_path) == 2
    assert "--config" in capsys.readouterr().err


# -- progress ------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "quiet", "expected"), [
    pytest.param(_Tty(), False, True, id="tty"),
    pytest.param(_Tty(), True, False, id="tty-quiet"),
    pytest.param(io.StringIO(), False, False, id="pipe"),
])
def test_progress_only_on_a_terminal(stream: io.StringIO, quiet: bool, expected: bool) -> None:
    """The bar shows only when stderr is a terminal and --quiet is not given."""
    assert progress_enabled(stream, quiet) is expected


def test_progress_bar_shows_status() -> None:
    """The bar shows episode, rate, last checkpoint, the writer's queue, val_score, ETA."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200)
    with RichReporter(console) as bar:
        bar.update(TrainStatus(episode=50, first_episode=0, last_episode=100,
                               episodes_per_second=1234.0, last_checkpoint="ep_000050",
                               writer_pending=3, max_pending=2, val_score=0.52))
    text = buf.getvalue()
    for part in ("episode 50/100", "1,234 ep/s", "last ckpt ep_000050", "queued 2/2, writing 1",
                 "val 0.520", "eta"):
        assert part in text


# -- ls / show / verify / du -----------------------------------------------------------


def test_ls_checkpoints_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ls lists name, episode, steps, size, age, latest marker and status."""
    ck = _ckpts(_run(tmp_path, validation_freq=100))
    assert cli(["ls", str(ck)], tmp_path) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if "ep_0" in ln]
    assert len(rows) == 2
    assert "ep_000100" in rows[0]
    assert "complete" in rows[0]
    assert "<- latest" in rows[1]
    assert "<- latest" not in rows[0]
    assert "0.620" in rows[0]
    for col in ("name", "episode", "steps", "val_score", "size", "age", "pointer", "status"):
        assert col in out


def test_ls_run_name_dir_lists_every_run(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """ls outputs/<run_name>/ shows one table per run; a run dir shows its own."""
    first = _run(tmp_path)
    second = _run(tmp_path)
    assert cli(["ls", "outputs/my_run"], tmp_path) == 0
    out = capsys.readouterr().out
    assert str(_ckpts(first).relative_to(tmp_path)) in out
    assert str(_ckpts(second).relative_to(tmp_path)) in out
    assert cli(["ls", str(second.run_dir)], tmp_path) == 0
    out = capsys.readouterr().out
    assert str(_ckpts(first)) not in out
    assert str(_ckpts(second)) in out
    assert out.count("ep_000200") == 1


def test_ls_marks_incomplete_checkpoint(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint with a missing file is listed as INCOMPLETE with the file named."""
    ck = _ckpts(_run(tmp_path))
    (ck / "ep_000100" / "agent.json").unlink()
    assert cli(["ls", str(ck)], tmp_path) == 0
    assert "INCOMPLETE (agent.json: missing)" in capsys.readouterr().out


def test_ls_nothing_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ls on a path without checkpoints exits 1 with "Checkpoint not found"."""
    assert cli(["ls", str(tmp_path / "nope")], tmp_path) == 1
    assert capsys.readouterr().err.startswith(f"error: Checkpoint not found: {tmp_path / 'nope'}")


def test_show_prints_manifests_and_counts(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """show prints runtime.json, agent.json and memory entry counts by type."""
    ck = _ckpts(_run(tmp_path))
    assert cli(["show", str(ck / "latest")], tmp_path) == 0
    out = capsys.readouterr().out
    assert f"Checkpoint {ck / 'ep_000200'}" in out
    assert '"episode_index": 200' in out
    assert '"memory_type": "history"' in out
    assert "memory (memory_200.jsonl):" in out
    for kind in ("Observation", "Action", "Feedback", "Reflection"):
        assert f"  {kind}" in out


def test_show_reports_fallback_as_warning(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """With latest broken, show falls back and prints the warning on stderr."""
    ck = _ckpts(_run(tmp_path))
    (ck / "ep_000200" / "memory_200.jsonl").write_bytes(b"garbage\n")
    assert cli(["show", str(ck / "latest")], tmp_path) == 0
    out, err = capsys.readouterr()
    assert f"Checkpoint {ck / 'ep_000100'}" in out
    assert err.startswith("warning: latest points at ep_000200, which is broken")


def test_verify_all_good_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify on a run name dir checks every checkpoint and exits 0."""
    _run(tmp_path)
    assert cli(["verify", "outputs/my_run"], tmp_path) == 0
    out = capsys.readouterr().out
    assert out.count("OK      ") == 2
    assert "2/2 checkpoints OK" in out


def test_verify_names_the_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One flipped byte makes verify exit 1 and name the file."""
    ck = _ckpts(_run(tmp_path))
    mem = ck / "ep_000100" / "memory_100.jsonl"
    data = bytearray(mem.read_bytes())
    data[10] ^= 1
    mem.write_bytes(bytes(data))
    assert cli(["verify", str(ck)], tmp_path) == 1
    out = capsys.readouterr().out
    assert (f"BROKEN  {ck / 'ep_000100'}: memory_100.jsonl: sha256 does not match runtime.json"
            in out)
    assert "1/2 checkpoints OK, 1 problem(s)" in out


def test_verify_single_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify accepts one checkpoint directory."""
    ck = _ckpts(_run(tmp_path))
    assert cli(["verify", str(ck / "ep_000200")], tmp_path) == 0
    assert "1/1 checkpoints OK" in capsys.readouterr().out


def test_verify_dangling_latest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A latest pointing at a deleted checkpoint is reported."""
    ck = _ckpts(_run(tmp_path))
    (ck / "latest").unlink()
    (ck / "latest").symlink_to("ep_000900")
    assert cli(["verify", str(ck)], tmp_path) == 1
    assert "points at ep_000900, which does not exist" in capsys.readouterr().out


def test_du_per_checkpoint_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """du prints each checkpoint's size, each run's total and a grand total."""
    a, b = _run(tmp_path), _run(tmp_path)
    assert cli(["du", "outputs/my_run"], tmp_path) == 0
    out = capsys.readouterr().out
    assert out.count("ep_000") == 4
    assert f"{a.run_dir.relative_to(tmp_path)}  (run total)" in out
    assert f"{b.run_dir.relative_to(tmp_path)}  (run total)" in out
    assert out.rstrip().endswith("total")


def test_du_does_not_follow_a_symlinked_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A symlinked ep_* to a large tree outside adds 0 B: du counts what is in the run."""
    ck = _ckpts(_run(tmp_path))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"\0" * (3 * 2**20))
    (ck / "ep_000900").symlink_to(outside, target_is_directory=True)
    assert cli(["du", str(ck.parent)], tmp_path) == 0
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if ln.endswith("ep_000900")]
    assert line.split()[:2] == ["0", "B"]
    assert "MiB" not in out


def test_size_and_age_formats() -> None:
    """Sizes print like du -h and ages in the largest whole unit."""
    assert (format_size(512), format_size(2048), format_size(3 * 1024**3)) == (
        "512 B", "2.0 KiB", "3.0 GiB")
    now = datetime(2024, 1, 15, 12, 31, 0, tzinfo=timezone.utc)
    assert format_age("2024-01-15T10:30:45.123456Z", now=now) == "2h"
    assert format_age("2024-01-15T12:30:45.123456Z", now=now) == "14s"


def test_bench_delegates_to_bench_main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`ckptwriter bench ARGS` calls ckptwriter.bench.main(ARGS) and returns its code."""
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setitem(sys.modules, "ckptwriter.bench",
                        types.SimpleNamespace(main=fake_main))
    assert cli(["bench", "--only", "stall", "--json", "x.json"], tmp_path) == 7
    assert seen == [["--only", "stall", "--json", "x.json"]]


# -- signals (real subprocesses) -------------------------------------------------------


def _spawn(tmp_path: Path, text: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    cfg = write_config(tmp_path, "long", text)
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "ckptwriter", "train", "--config", str(cfg)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )


def _wait_for_latest(tmp_path: Path, proc: subprocess.Popen[str]) -> Path:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = list((tmp_path / "outputs" / "long").glob("*/checkpoints/latest"))
        if found:
            return found[0].parent
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"no checkpoint appeared; rc={proc.returncode}\n{out}\n{err}")


@pytest.mark.parametrize(("sig", "code"), [
    pytest.param(signal.SIGINT, 130, id="SIGINT"),
    pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
    pytest.param(signal.SIGHUP, 129, id="SIGHUP"),
])
def test_signal_finishes_episode_and_writes_final_checkpoint(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """SIGINT/SIGTERM/SIGHUP (to the process group): final checkpoint, drain, 130/143/129."""
    proc = _spawn(tmp_path, "runtime:\n  max_envs_to_visit: 100000000\n"
                  "  checkpoint_every_episodes: 1000\n  checkpoint_keep_last: 2\n")
    ck = _wait_for_latest(tmp_path, proc)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert f"Received {sig.name}: finishing the current episode" in err
    stopped = int(out.split("Stopped at episode ")[1].split("/")[0])
    latest = json.loads((ck / "latest.json").read_text())
    assert latest["episode_index"] == stopped
    assert f"Checkpoints are in outputs/long/{ck.parent.name}/checkpoints" in out
    final = f"outputs/long/{ck.parent.name}/checkpoints/ep_{stopped:06d}"
    assert f"the last durable checkpoint is {final}; to continue from it, set " \
           f"runtime.resume_from: {final}" in out
    assert cli(["verify", str(ck)], tmp_path) == 0


# checkpoint_on_start: the first checkpoint is ep 0, written before any episode runs, so
# the run is past it whenever the signal is seen, however slow or busy the machine is.
_HANGUP_RUN = ("runtime:\n  checkpoint_on_start: true\n  max_envs_to_visit: 100000000\n"
               "  checkpoint_every_episodes: 1000\n")


def test_hangup_writes_a_final_checkpoint_past_the_first(tmp_path: Path) -> None:
    """SIGHUP to the group (ssh dropped): the run and its writer process save, exit 129."""
    proc = _spawn(tmp_path, _HANGUP_RUN)
    ck = _wait_for_latest(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 129, err
    assert "Received SIGHUP: finishing the current episode" in err
    assert "exited unexpectedly" not in err  # the writer process outlived the hangup
    stopped = int(out.split("Stopped at episode ")[1].split("/")[0])
    assert (ck / "ep_000000").is_dir()
    assert stopped > 0
    loaded = load_checkpoint(ck / "latest")
    assert loaded.runtime.episode_index == stopped
    assert loaded.path.name == f"ep_{stopped:06d}"


def test_hangup_under_nohup_is_ignored(tmp_path: Path) -> None:
    """A run started under nohup keeps SIGHUP ignored; SIGTERM still stops it with 143."""
    proc = _spawn(tmp_path, _HANGUP_RUN, prefix=("nohup",))
    ck = _wait_for_latest(tmp_path, proc)
    # An ignored signal is discarded when it is sent: the SIGTERM after it is the first
    # (and only) signal the run sees.
    os.killpg(proc.pid, signal.SIGHUP)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Received SIGHUP" not in err
    assert "Received SIGTERM: finishing the current episode" in err
    stopped = int(out.split("Stopped at episode ")[1].split("/")[0])
    assert load_checkpoint(ck / "latest").runtime.episode_index == stopped


def test_second_signal_exits_at_once_leaving_only_whole_checkpoints(tmp_path: Path) -> None:
    """A second SIGINT exits immediately; every checkpoint on disk still verifies."""
    (tmp_path / "slow_agent.py").write_text(
        "import anyio\n"
        "from ckptwriter.runtime import HistoryAgent\n"
        "class SlowAgent(HistoryAgent):\n"
        "    async def act(self, observation):\n"
        "        await anyio.sleep(1.0)\n"
        "        return await super().act(observation)\n"
    )
    proc = _spawn(tmp_path, "agent:\n  type: slow_agent:SlowAgent\nruntime:\n"
                  "  checkpoint_on_start: true\n  max_envs_to_visit: 1000\n"
                  "  checkpoint_every_episodes: 1\n")
    ck = _wait_for_latest(tmp_path, proc)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert time.monotonic() - t0 < 0.9, "did not exit before the episode finished"
    assert "Received SIGINT again: exiting immediately" in err
    assert "Stopped at episode" not in out
    assert cli(["verify", str(ck)], tmp_path) == 0


def test_error_inside_training_is_one_message(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """An error raised mid-run (agent breaks the protocol) is one line and exit 1."""
    (tmp_path / "int_agent.py").write_text(
        "from ckptwriter.runtime import HistoryAgent\n"
        "class IntAgent(HistoryAgent):\n"
        "    async def act(self, observation):\n"
        "        return 5\n"
    )
    cfg = write_config(tmp_path, "bad", "agent:\n  type: int_agent:IntAgent\n"
                       "runtime:\n  checkpoint_every_episodes: 10\n")
    assert cli(["train", "-q", "--config", str(cfg)], tmp_path) == 1
    err = capsys.readouterr().err
    assert err == ("error: IntAgent.act returned int, expected str (see ckptwriter.runtime.Agent)\n"
                   "no checkpoint was written: there is nothing to resume from\n")


def test_failed_checkpoint_write_stops_training_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """on_error: raise: a checkpoint that cannot be written ends the run with exit 1."""
    # Episode 30's act: the writer is left to finish ep_000020 (latest.json names it, the
    # last step of a keep-all commit) before the directory goes, so no commit is in flight
    # (ep_000030 is submitted after this act) and ep_000030 is the first checkpoint that
    # cannot be written, on any machine: no race between rmtree and the writer.
    (tmp_path / "vandal.py").write_text(
        "import json, pathlib, shutil, time\n"
        "import anyio\n"
        "from ckptwriter.runtime import HistoryAgent\n"
        "def latest(ckpts):\n"
        "    try:\n"
        "        return json.loads((ckpts / 'latest.json').read_text())['checkpoint']\n"
        "    except (FileNotFoundError, ValueError):\n"
        "        return None\n"
        "class Vandal(HistoryAgent):\n"
        "    calls = 0\n"
        "    async def act(self, observation):\n"
        "        Vandal.calls += 1\n"
        "        if Vandal.calls == 30:\n"
        "            [ckpts] = pathlib.Path('outputs').glob('*/*/checkpoints')\n"
        "            deadline = time.monotonic() + 120\n"
        "            while latest(ckpts) != 'ep_000020':\n"
        "                assert time.monotonic() < deadline, 'ep_000020 never committed'\n"
        "                await anyio.sleep(0.005)\n"
        "            shutil.rmtree(ckpts)\n"
        "        return await super().act(observation)\n"
    )
    # One attempt per episode: act call N is episode N.
    cfg = write_config(tmp_path, "gone", "agent:\n  type: vandal:Vandal\n"
                       "environment:\n  max_attempts: 1\nruntime:\n"
                       "  checkpoint_every_episodes: 10\n  max_envs_to_visit: 200\n")
    assert cli(["train", "-q", "--config", str(cfg)], tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint for episode 30 ")
    assert "Traceback" not in err


def test_config_without_subcommand_means_train(tmp_path: Path) -> None:
    """`python -m ckptwriter --config FILE` (the guide's multi-stage form) trains."""
    cfg = tmp_path / "stage1.yaml"
    cfg.write_text("runtime:\n  max_envs_to_visit: 3\n  executor: thread\n")
    assert cli(["--config", str(cfg)], tmp_path) == 0
    assert list((tmp_path / "outputs" / "stage1").glob("*/checkpoints/ep_000003"))


def test_verify_warns_when_latest_json_disagrees(tmp_path: Path) -> None:
    """verify names a latest.json that disagrees with the latest symlink, without failing."""
    ck = train(config(tmp_path, max_envs_to_visit=20, checkpoint_every_episodes=10)).checkpoint_dir
    assert ck is not None
    (ck / "latest.json").write_text(
        (ck / "latest.json").read_text().replace("ep_000020", "ep_000010"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli(["verify", str(ck)], tmp_path)
    assert code == 0
    assert "latest.json: names ep_000010 but latest points at ep_000020" in buf.getvalue()
