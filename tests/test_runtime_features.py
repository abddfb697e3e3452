"""Issue 12's runtime features through the CLI: metric direction, keep-forever, time-based
and on-exception checkpoints, resume_from auto / best, and the rough edges of a new user."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
import yaml

from _fault_util import fill_disk, mounted_tmpfs
from _runtime_util import cli, runtime_json, validation_file, write_config
from ckptwriter import MemoryLog, load_checkpoint
from ckptwriter.config import EnvironmentConfig
from ckptwriter.runtime import ArithmeticEnvironment, HistoryAgent


def _names(ckpt_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(ckpt_dir) if n.startswith("ep_"))


def _runs(tmp_path: Path, name: str) -> list[Path]:
    root = tmp_path / "outputs" / name
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _train(tmp_path: Path, name: str, runtime: dict[str, Any], *args: str,
           **top: Any) -> int:
    runtime.setdefault("executor", "thread")
    data = {"runtime": runtime, **top}
    return cli(["train", "--config", str(write_config(tmp_path, name, data)), *args], tmp_path)


def _memory(ckpt: Path) -> bytes:
    [mem] = ckpt.glob("memory_*.jsonl")
    return mem.read_bytes()


class FailingAgent(HistoryAgent):
    """A HistoryAgent whose ``act`` raises on its ``fail_at``-th call (mid-episode)."""

    def __init__(self, config: dict[str, Any], memory: MemoryLog) -> None:
        super().__init__({}, memory)
        self.config = dict(config)
        self._calls = 0

    async def act(self, observation: str) -> str:
        self._calls += 1
        if self._calls == self.config["fail_at"]:
            raise RuntimeError("the simulator crashed")
        return await super().act(observation)


class DiskFillingAgent(HistoryAgent):
    """A HistoryAgent that, at the start of episode ``after + 1``, waits until episode
    ``after`` is committed in ``config["dir"]`` and then fills the filesystem
    ``config["mnt"]``: every later checkpoint fails for lack of space."""

    def __init__(self, config: dict[str, Any], memory: MemoryLog) -> None:
        super().__init__({}, memory)
        self.config = dict(config)
        seq = ArithmeticEnvironment(EnvironmentConfig()).sequence()
        questions = [next(seq).question for _ in range(self.config["after"] + 1)]
        self._trigger = questions[-1]
        assert self._trigger not in questions[:-1]  # episode after+1 is recognizable
        self._done = False

    async def act(self, observation: str) -> str:
        if not self._done and observation == self._trigger:
            marker = Path(self.config["dir"]) / f"ep_{self.config['after']:06d}" / "runtime.json"
            # Polled: the writer (a thread here) signals nothing the agent could await.
            with anyio.fail_after(60):
                while not marker.exists():  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            fill_disk(Path(self.config["mnt"]), leave=0)
            self._done = True
        return await super().act(observation)


class SleepyAgent(HistoryAgent):
    """A HistoryAgent that takes at least ``seconds`` per episode (one sleep per act)."""

    seconds: ClassVar[float] = 0.0

    async def act(self, observation: str) -> str:
        await anyio.sleep(SleepyAgent.seconds)
        return await super().act(observation)


# -- checkpoint_mode, checkpoint_keep_every ---------------------------------------------


def test_checkpoint_mode_min_keeps_the_lowest_scores(tmp_path: Path) -> None:
    """checkpoint_mode: min -> top_k_val keeps the lowest val_scores, and best is the lowest."""
    rc = _train(tmp_path, "lossy", {
        "max_envs_to_visit": 250, "validation_freq": 50, "checkpoint_strategy": "top_k_val",
        "checkpoint_keep_last": 2, "checkpoint_mode": "min"},
        agent={"type": "_runtime_util:ScriptedAgent",
               "config": {"scores": [0.45, 0.52, 0.40, 0.55, 0.51]}},
        validation={"validation_dataset": str(validation_file(tmp_path))})
    assert rc == 0
    [run] = _runs(tmp_path, "lossy")
    ck = run / "checkpoints"
    # The lowest two (ep 50: .45, ep 150: .40) plus the newest, which is never deleted.
    assert _names(ck) == ["ep_000050", "ep_000150", "ep_000250"]
    assert yaml.safe_load((run / "config.yaml").read_text())["runtime"]["checkpoint_mode"] == "min"
    if (ck / "best").is_symlink():  # the writer's best pointer (H6) follows the mode
        assert os.readlink(ck / "best") == "ep_000150"


def test_checkpoint_keep_every_survives_last_n(tmp_path: Path) -> None:
    """checkpoint_keep_every: 100 with keep_last 2: multiples of 100 are never deleted."""
    assert _train(tmp_path, "keep", {
        "max_envs_to_visit": 350, "checkpoint_every_episodes": 50, "checkpoint_keep_last": 2,
        "checkpoint_keep_every": 100}) == 0
    [run] = _runs(tmp_path, "keep")
    assert _names(run / "checkpoints") == [
        "ep_000100", "ep_000200", "ep_000300", "ep_000350"]


@pytest.mark.parametrize(("runtime", "words"), [
    pytest.param({"checkpoint_keep_every": 0}, "runtime.checkpoint_keep_every", id="keep0"),
    pytest.param({"checkpoint_mode": "lowest"}, "runtime.checkpoint_mode", id="mode"),
    pytest.param({"checkpoint_every_seconds": -1}, "runtime.checkpoint_every_seconds",
                 id="seconds"),
    pytest.param({"resume_from": ""}, "runtime.resume_from '' names no checkpoint",
                 id="resume-empty"),
    pytest.param({"checkpoint_dir": "$H7_UNSET_VAR/ck"}, "H7_UNSET_VAR is not set",
                 id="unset-var"),
])
def test_bad_values_name_the_yaml_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      runtime: dict[str, Any], words: str) -> None:
    """Each new key's bad value is a config error (exit 2) naming the file and the key."""
    os.environ.pop("H7_UNSET_VAR", None)
    assert _train(tmp_path, "bad", {"max_envs_to_visit": 5, **runtime}) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: " in err
    assert words in err
    assert not (tmp_path / "outputs").exists()


# -- checkpoint_every_seconds -----------------------------------------------------------


def test_every_seconds_checkpoints_each_slow_episode(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Episodes that each take longer than checkpoint_every_seconds are each saved."""
    monkeypatch.setattr(SleepyAgent, "seconds", 0.02)
    assert _train(tmp_path, "timed", {
        "max_envs_to_visit": 6, "checkpoint_every_seconds": 0.01},
        agent={"type": "test_runtime_features:SleepyAgent"}) == 0
    [run] = _runs(tmp_path, "timed")
    assert _names(run / "checkpoints") == [f"ep_{n:06d}" for n in range(1, 7)]


def test_every_seconds_with_episodes_whichever_first(tmp_path: Path) -> None:
    """A long time interval with checkpoint_every_episodes: the episode interval decides."""
    assert _train(tmp_path, "both", {
        "max_envs_to_visit": 120, "checkpoint_every_episodes": 50,
        "checkpoint_every_seconds": 3600}) == 0
    [run] = _runs(tmp_path, "both")
    assert _names(run / "checkpoints") == ["ep_000050", "ep_000100", "ep_000120"]


def test_no_interval_says_only_the_final_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Neither interval set: a warning at start says only the final checkpoint is written."""
    assert _train(tmp_path, "bare", {"max_envs_to_visit": 30}, "-q") == 0
    err = capsys.readouterr().err
    assert "only the final checkpoint will be written" in err
    assert "checkpoint_every_episodes" in err
    assert _train(tmp_path, "set", {"max_envs_to_visit": 30,
                                    "checkpoint_every_episodes": 10}, "-q") == 0
    assert "only the final checkpoint" not in capsys.readouterr().err


# -- checkpoint_on_exception ------------------------------------------------------------


def test_agent_exception_checkpoints_last_completed_episode(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The agent raises mid-episode: the last completed episode is saved (its memory as
    an uninterrupted run's at that episode, byte for byte), exit 1 with the traceback and
    the resume line; resuming from it ends as the uninterrupted run does."""
    assert _train(tmp_path, "fail", {"max_envs_to_visit": 40, "checkpoint_every_episodes": 10},
                  agent={"type": "test_runtime_features:FailingAgent",
                         "config": {"fail_at": 40}}) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: the simulator crashed" in err
    assert "Traceback" in err
    [run] = _runs(tmp_path, "fail")
    ck = run / "checkpoints"
    saved = json.loads((ck / "latest.json").read_text())["episode_index"]
    assert saved % 10 != 0  # not a scheduled checkpoint: the one written on exception
    final = f"outputs/fail/{run.name}/checkpoints/ep_{saved:06d}"
    assert f"the last durable checkpoint is {final}; to continue from it, set " \
           f"runtime.resume_from: {final}" in err
    # The same run without the failure, a checkpoint every episode, as the reference.
    assert _train(tmp_path, "whole", {"max_envs_to_visit": 40,
                                      "checkpoint_every_episodes": 1}) == 0
    [whole] = _runs(tmp_path, "whole")
    ref = whole / "checkpoints" / f"ep_{saved:06d}"
    assert _memory(ck / f"ep_{saved:06d}") == _memory(ref)
    assert runtime_json(ck / f"ep_{saved:06d}")["train_steps_total"] == \
        runtime_json(ref)["train_steps_total"]
    # Resumed (with a healthy agent), it ends byte-identical with the uninterrupted run.
    assert _train(tmp_path, "again", {"max_envs_to_visit": 40, "resume_from": final,
                                      "checkpoint_every_episodes": 40}) == 0
    [again] = _runs(tmp_path, "again")
    assert _memory(again / "checkpoints" / "ep_000040") == \
        _memory(whole / "checkpoints" / "ep_000040")


def test_on_exception_false_writes_nothing_more(tmp_path: Path) -> None:
    """checkpoint_on_exception: false: only the scheduled checkpoints exist."""
    assert _train(tmp_path, "off", {"max_envs_to_visit": 40, "checkpoint_every_episodes": 10,
                                    "checkpoint_on_exception": False},
                  agent={"type": "test_runtime_features:FailingAgent",
                         "config": {"fail_at": 40}}) == 1
    [run] = _runs(tmp_path, "off")
    assert all(int(n[3:]) % 10 == 0 for n in _names(run / "checkpoints"))


# -- resume_from: auto ------------------------------------------------------------------


def test_resume_auto_first_run_starts_fresh_then_continues_in_place(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """auto: no checkpoint yet -> fresh start (exit 0, not 1); the second run continues
    the same run directory; a third, already complete, trains nothing and exits 0."""
    rt = {"max_envs_to_visit": 60, "checkpoint_every_episodes": 20, "checkpoint_keep_last": 2,
          "resume_from": "auto"}
    assert _train(tmp_path, "job", dict(rt)) == 0
    [run] = _runs(tmp_path, "job")
    assert _train(tmp_path, "job", dict(rt), "--set", "runtime.max_envs_to_visit=100") == 0
    assert _runs(tmp_path, "job") == [run]
    assert _names(run / "checkpoints") == ["ep_000080", "ep_000100"]
    recorded = yaml.safe_load((run / "config.yaml").read_text())["runtime"]
    assert (recorded["max_envs_to_visit"], recorded["checkpoint_dir"]) == (100, "checkpoints")
    capsys.readouterr()
    assert _train(tmp_path, "job", dict(rt), "--set", "runtime.max_envs_to_visit=100") == 0
    assert "already complete at episode 100" in capsys.readouterr().err
    assert _runs(tmp_path, "job") == [run]


def test_resume_auto_from_the_command_line(tmp_path: Path) -> None:
    """`ckptwriter train --resume auto` is resume_from: auto; `--resume PATH` a path."""
    rt = {"max_envs_to_visit": 30, "checkpoint_every_episodes": 10}
    assert _train(tmp_path, "cmd", dict(rt), "--resume", "auto") == 0
    [run] = _runs(tmp_path, "cmd")
    assert _train(tmp_path, "cmd", dict(rt), "--resume", "auto",
                  "--set", "runtime.max_envs_to_visit=50") == 0
    assert _runs(tmp_path, "cmd") == [run]
    assert load_checkpoint(run / "checkpoints").runtime.episode_index == 50
    # A path: a new run directory, as resume_from: PATH always did.
    assert _train(tmp_path, "cmd", dict(rt), "--resume", str(run / "checkpoints" / "ep_000030"),
                  "--set", "runtime.max_envs_to_visit=40") == 0
    assert len(_runs(tmp_path, "cmd")) == 2


def test_resume_auto_top_k_spans_the_whole_chain(tmp_path: Path) -> None:
    """top_k_val across auto-resumed pieces keeps the K best of all of them."""
    scores = [0.9, 0.1, 0.2, 0.3, 0.8, 0.4]
    common = {"validation_freq": 10, "checkpoint_strategy": "top_k_val",
              "checkpoint_keep_last": 2, "resume_from": "auto"}
    val = {"validation_dataset": str(validation_file(tmp_path))}
    for end, part in ((30, scores[:3]), (60, scores[3:])):
        assert _train(tmp_path, "chain", {**common, "max_envs_to_visit": end},
                      agent={"type": "_runtime_util:ScriptedAgent", "config": {"scores": part}},
                      validation=val) == 0
    [run] = _runs(tmp_path, "chain")
    # 0.9 (ep 10, first piece) and 0.8 (ep 50) plus the newest, never deleted.
    assert _names(run / "checkpoints") == ["ep_000010", "ep_000050", "ep_000060"]


def test_resume_auto_follows_an_absolute_checkpoint_dir(tmp_path: Path) -> None:
    """Runs with an absolute checkpoint_dir are found from outputs/<run_name> (auto, path)."""
    shared = tmp_path / "scratch" / "ckpts"
    rt = {"max_envs_to_visit": 20, "checkpoint_every_episodes": 10,
          "checkpoint_dir": str(shared), "resume_from": "auto"}
    assert _train(tmp_path, "abs", dict(rt)) == 0
    assert _train(tmp_path, "abs", dict(rt), "--set", "runtime.max_envs_to_visit=30") == 0
    assert _names(shared) == ["ep_000010", "ep_000020", "ep_000030"]
    assert len(_runs(tmp_path, "abs")) == 1
    # resume_from: outputs/<run_name> follows the run's config.yaml to the checkpoints too.
    assert _train(tmp_path, "abs2", {"max_envs_to_visit": 40, "checkpoint_every_episodes": 40,
                                     "resume_from": "outputs/abs"}) == 0
    [run2] = _runs(tmp_path, "abs2")
    assert runtime_json(run2 / "checkpoints" / "ep_000040")["resumed_from"].endswith(
        "ckpts/ep_000030")


# -- resume_from: best ------------------------------------------------------------------


def _fake_best(ckpts: Path, name: str) -> None:
    """A best pointer as the writer keeps it: relative symlink + best.json (latest schema)."""
    (ckpts / "best").unlink(missing_ok=True)
    os.symlink(name, ckpts / "best")
    doc = json.loads((ckpts / "latest.json").read_text())
    rt = runtime_json(ckpts / name)
    doc.update({k: rt[k] for k in doc if k in rt})
    doc["checkpoint"] = name if "checkpoint" in doc else doc.get("checkpoint")
    (ckpts / "best.json").write_text(json.dumps(doc))


def test_resume_from_best(tmp_path: Path) -> None:
    """resume_from: <run>/checkpoints/best and `best` (the run name's newest best)."""
    assert _train(tmp_path, "bst", {
        "max_envs_to_visit": 30, "validation_freq": 10, "checkpoint_strategy": "top_k_val",
        "checkpoint_keep_last": 3},
        agent={"type": "_runtime_util:ScriptedAgent", "config": {"scores": [0.3, 0.7, 0.5]}},
        validation={"validation_dataset": str(validation_file(tmp_path))}) == 0
    [run] = _runs(tmp_path, "bst")
    ck = run / "checkpoints"
    if not (ck / "best").is_symlink():
        _fake_best(ck, "ep_000020")  # the writer's pointer not there yet: made as it will be
    assert os.readlink(ck / "best") == "ep_000020"
    for i, where in enumerate((str(ck / "best"), "best")):
        name = f"from_best{i}"
        assert _train(tmp_path, name, {"max_envs_to_visit": 25, "checkpoint_every_episodes": 25,
                                       "resume_from": where}, run_name="bst") == 0
        resumed = sorted(_runs(tmp_path, "bst"))[-1]
        rt = runtime_json(resumed / "checkpoints" / "ep_000025")
        assert rt["resumed_from"].endswith("checkpoints/ep_000020"), where


def test_resume_from_best_without_one_is_not_found(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """resume_from: best with no best checkpoint in any run: exit 1, says what is needed."""
    assert _train(tmp_path, "nob", {"max_envs_to_visit": 10}) == 0
    assert _train(tmp_path, "nob", {"max_envs_to_visit": 20, "resume_from": "best"}) == 1
    assert "needs a run of nob with a best checkpoint" in capsys.readouterr().err


# -- rough edges ------------------------------------------------------------------------


def test_home_and_variables_expanded_in_paths(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`~` and $VARS in checkpoint_dir/output_dir are expanded, never literal directories."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("H7_SCRATCH", str(tmp_path / "scratch"))
    assert _train(tmp_path, "exp", {"max_envs_to_visit": 10,
                                    "checkpoint_dir": "~/ckpts/exp"},
                  output_dir="$H7_SCRATCH/outputs") == 0
    assert _names(tmp_path / "home" / "ckpts" / "exp") == ["ep_000010"]
    [run] = (tmp_path / "scratch" / "outputs" / "exp").iterdir()
    assert not list(run.glob("~*"))
    assert not (tmp_path / "$H7_SCRATCH").exists()


def test_on_error_warn_logs_once_and_summary_counts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """on_error: warn, the checkpoints' (real, small) filesystem full after ep 10: one
    warning per failure, and the summary counts them and names the last durable one."""
    with mounted_tmpfs(tmp_path / "mnt") as mnt:
        ro = mnt / "ckpts"
        rc = _train(tmp_path, "warn", {
            "max_envs_to_visit": 40, "checkpoint_every_episodes": 10, "on_error": "warn",
            "checkpoint_dir": str(ro)},
            agent={"type": "test_runtime_features:DiskFillingAgent",
                   "config": {"dir": str(ro), "mnt": str(mnt), "after": 10}})
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    failures = re.findall(r"checkpoint for episode (\d+) failed", captured.err, re.IGNORECASE)
    assert sorted(set(failures)) == ["20", "30", "40"], captured.err
    assert len(failures) == 3  # each failure logged once, not by writer and runtime both
    assert "3 checkpoint(s) failed to write" in captured.out
    assert f"the last durable one is {ro / 'ep_000010'}" in captured.out


def test_locked_refusal_leaves_no_run_directory(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A run refused because another writer holds checkpoint_dir leaves no run dir."""
    from ckptwriter import SyncCheckpointWriter

    shared = tmp_path / "shared"
    with SyncCheckpointWriter(shared, executor="thread"):
        rc = _train(tmp_path, "locked", {"max_envs_to_visit": 5, "checkpoint_dir": str(shared)})
    assert rc == 1
    assert "lock" in capsys.readouterr().err.lower()
    assert _runs(tmp_path, "locked") == []


def test_agent_errors_name_the_config_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """agent.type / agent.config errors name the file, as other config errors do."""
    assert _train(tmp_path, "agt", {"max_envs_to_visit": 5},
                  agent={"type": "nosuchmodule_h7:Agent"}) == 2
    assert "agt.yaml: agent.type 'nosuchmodule_h7:Agent'" in capsys.readouterr().err
    assert _train(tmp_path, "agc", {"max_envs_to_visit": 5},
                  agent={"config": {"lern": True}}) == 2
    assert "agc.yaml: agent.config.lern" in capsys.readouterr().err


# -- the guide's examples (examples/long_runs/) -----------------------------------------


LONG_RUNS = Path(__file__).resolve().parent.parent / "examples" / "long_runs"


def test_long_runs_examples_run_as_the_guide_says(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """preemptible.yaml twice (one run directory, keep_every kept), best.yaml, from_best.yaml."""
    def run(name: str) -> str:
        assert cli(["train", "-q", "--config", str(LONG_RUNS / f"{name}.yaml")], tmp_path) == 0
        return capsys.readouterr().out

    run("preemptible")
    assert "(0 episodes" in run("preemptible")  # requeued after the end: nothing to do
    [run_dir] = _runs(tmp_path, "preemptible")
    assert _names(run_dir / "checkpoints") == ["ep_000100", "ep_000200", "ep_000250",
                                               "ep_000300"]
    run("best")
    [first] = _runs(tmp_path, "best")
    best = os.readlink(first / "checkpoints" / "best")
    assert best in _names(first / "checkpoints")
    run("from_best")
    newest = sorted(_runs(tmp_path, "best"))[-1]
    rt = runtime_json(newest / "checkpoints" / "ep_000300")
    assert rt["resumed_from"] == str((first / "checkpoints" / best).resolve())


def _point_latest_at(ckpts: Path, name: str) -> None:
    """The state a kill between committing a checkpoint and moving latest leaves."""
    newest = json.loads((ckpts / "latest.json").read_text())
    os.unlink(ckpts / "latest")
    os.symlink(name, ckpts / "latest")
    older = runtime_json(ckpts / name)
    newest.update(checkpoint=name, episode_index=older["episode_index"],
                  timestamp=older["timestamp"], val_score=older.get("val_score"))
    (ckpts / "latest.json").write_text(json.dumps(newest))


def test_resume_auto_when_latest_lags_a_committed_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A kill between ep 40's commit and the pointer move leaves latest on ep 30: auto
    resumes from ep 40 (whole and durable) in place, says so, and does not collide with it
    (found by the kill -9 torture with a reader: the next run died on ep 40 existing)."""
    rt = {"max_envs_to_visit": 40, "checkpoint_every_episodes": 10, "checkpoint_keep_last": 3,
          "resume_from": "auto"}
    assert _train(tmp_path, "lag", dict(rt)) == 0
    [run] = _runs(tmp_path, "lag")
    ckpts = run / "checkpoints"
    expected = _memory(ckpts / "ep_000040")
    _point_latest_at(ckpts, "ep_000030")
    capsys.readouterr()
    assert _train(tmp_path, "lag", dict(rt), "--set", "runtime.max_envs_to_visit=60") == 0
    err = capsys.readouterr().err
    assert "latest names ep_000030, but ep_000040 was committed after it" in err
    assert _names(ckpts) == ["ep_000040", "ep_000050", "ep_000060"]
    assert _memory(ckpts / "ep_000040") == expected  # never re-committed
    assert load_checkpoint(ckpts / "latest").runtime.episode_index == 60


def test_a_named_checkpoint_is_resumed_as_named(tmp_path: Path) -> None:
    """resume_from naming ep_N (not a pointer) resumes exactly ep_N, newer ones or not."""
    rt = {"max_envs_to_visit": 30, "checkpoint_every_episodes": 10}
    assert _train(tmp_path, "named", dict(rt)) == 0
    [run] = _runs(tmp_path, "named")
    ckpt = run / "checkpoints" / "ep_000010"
    assert _train(tmp_path, "named", dict(rt), "--resume", str(ckpt),
                  "--set", "runtime.max_envs_to_visit=20") == 0
    new = next(r for r in _runs(tmp_path, "named") if r != run)
    assert runtime_json(new / "checkpoints" / "ep_000020")["resumed_from"].endswith(
        "ep_000010")
