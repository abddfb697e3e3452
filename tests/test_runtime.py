"""The training runtime: layout, schedules, retention timelines, resume, agents."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime
from pathlib import Path

import pytest

from _runtime_util import (
    IntervalAgent,
    ScriptedAgent,
    config,
    runtime_json,
    train,
    tree_digest,
    validation_file,
)
from ckptwriter import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    ConfigError,
    MemoryTypeMismatchError,
    Observation,
    load_checkpoint,
    verify_checkpoint,
)
from ckptwriter import layout as layout_mod
from ckptwriter.config import EnvironmentConfig
from ckptwriter.runtime import ArithmeticEnvironment, run_training
from ckptwriter.runtime.agents import resolve_agent_class

pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The runtime drives the writer: run on both anyio backends."""
    return str(request.param)


def _names(ckpt_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(ckpt_dir) if n.startswith("ep_"))


def _saved_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Checkpoint ")]


@pytest.mark.anyio
async def test_basic_layout_matches_guide(tmp_path: Path) -> None:
    """ep_000100, ep_000200, ep_000300 and latest -> ep_000300, as the guide shows."""
    cfg = config(tmp_path, "my_run", max_envs_to_visit=300, checkpoint_dir="checkpoints",
                 checkpoint_every_episodes=100, executor="auto")
    result = await run_training(cfg)
    ck = result.checkpoint_dir
    assert ck is not None
    assert ck.parent.parent == tmp_path / "outputs" / "my_run"
    assert re.fullmatch(r"\d{8}_\d{6}", ck.parent.name)
    assert _names(ck) == ["ep_000100", "ep_000200", "ep_000300"]
    assert os.readlink(ck / "latest") == "ep_000300"
    assert (ck.parent / "config.yaml").is_file()


def test_runtime_json_has_guide_fields(tmp_path: Path) -> None:
    """runtime.json holds the guide's fields with the episode and step counts."""
    cfg = config(tmp_path, max_envs_to_visit=100, checkpoint_every_episodes=100,
                 validation_freq=100)
    ck = train(cfg).checkpoint_dir
    assert ck is not None
    rt = runtime_json(ck / "ep_000100")
    assert {"timestamp", "episode_index", "train_steps_total", "agent_type",
            "memory_snapshot_path", "val_score"} <= rt.keys()
    assert (rt["episode_index"], rt["agent_type"]) == (100, "HistoryAgent")
    assert rt["memory_snapshot_path"] == "memory_100.jsonl"
    assert rt["train_steps_total"] >= 100
    assert 0.0 <= rt["val_score"] <= 1.0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", rt["timestamp"])


def test_memory_snapshot_lines_are_typed_entries(tmp_path: Path) -> None:
    """memory_100.jsonl holds Observation/Action/Feedback/Reflection lines as in the guide."""
    ck = train(config(tmp_path, max_envs_to_visit=100)).checkpoint_dir
    assert ck is not None
    lines = [json.loads(x) for x in (ck / "ep_000100" / "memory_100.jsonl").read_text()
             .splitlines()]
    assert lines[0]["type"] == "Observation"
    assert re.fullmatch(r"Solve: \d+[+\-*]\d+=\?", lines[0]["content"])
    assert lines[1]["type"] == "Action"
    assert lines[2]["type"] == "Feedback"
    assert set(lines[2]["content"]) == {"score", "message"}
    assert {x["type"] for x in lines} == {"Observation", "Action", "Feedback", "Reflection"}


def test_agent_learns_a_task_it_got_wrong(tmp_path: Path) -> None:
    """A task answered wrongly once is answered correctly the next time it is seen."""
    ck = train(config(tmp_path, max_envs_to_visit=300)).checkpoint_dir
    assert ck is not None
    mem = load_checkpoint(ck / "latest").memory
    first_try: dict[str, list[float]] = {}
    entries = list(mem)
    for i, e in enumerate(entries):
        if isinstance(e, Observation) and (i == 0 or entries[i - 1].type != "Reflection"):
            fb = entries[i + 2]
            assert fb.type == "Feedback"
            first_try.setdefault(e.content, []).append(fb.content.score)  # type: ignore[union-attr]
    learned = [s for s in first_try.values() if len(s) > 1 and s[0] == 0.0]
    assert learned, "no task was answered wrongly first and seen again"
    assert all(all(x == 1.0 for x in s[1:]) for s in learned)


def test_validation_improves_with_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """val_score at the end is higher than the baseline at start."""
    caplog.set_level(logging.INFO, "ckptwriter")
    cfg = config(tmp_path, max_envs_to_visit=400, validation_freq=400,
                 run_validation_at_start=True)
    result = train(cfg)
    scores = [float(m) for m in re.findall(r"val_score=([\d.]+)", caplog.text)]
    assert len(scores) == 2
    assert scores[0] < 0.5 < scores[1] == result.val_score


def test_steps_count_agent_steps(tmp_path: Path) -> None:
    """train_steps_total counts agent steps (= Action entries), not episodes."""
    result = train(config(tmp_path, max_envs_to_visit=200))
    assert result.checkpoint_dir is not None
    mem = load_checkpoint(result.checkpoint_dir / "latest").memory
    assert result.train_steps_total == mem.counts_by_type()["Action"] > 200


def test_last_n_timeline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The guide's last_n timeline: ep_000050 deleted at 300, ep_000100 at 350."""
    caplog.set_level(logging.INFO, "ckptwriter")
    cfg = config(tmp_path, max_envs_to_visit=350, checkpoint_dir="checkpoints",
                 checkpoint_every_episodes=50, checkpoint_strategy="last_n",
                 checkpoint_keep_last=5)
    ck = train(cfg).checkpoint_dir
    assert ck is not None
    lines = _saved_lines(caplog)
    assert [re.match(r"Checkpoint (ep_\d+)", x).group(1) for x in lines] == [  # type: ignore[union-attr]
        f"ep_{n:06d}" for n in range(50, 351, 50)]
    assert [x.endswith(", deleted ep_000050") for x in lines].index(True) == 5
    assert lines[6].endswith(", deleted ep_000100")
    assert not any("deleted" in x for x in lines[:5])
    assert _names(ck) == [f"ep_{n:06d}" for n in range(150, 351, 50)]


def test_top_k_val_timeline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The guide's top_k_val timeline with its scores 0.45 .52 .48 .55 .51."""
    caplog.set_level(logging.INFO, "ckptwriter")
    cfg = config(tmp_path, overrides=[
        "agent.type=_runtime_util:ScriptedAgent",
        "agent.config={scores: [0.45, 0.52, 0.48, 0.55, 0.51]}",
        f"validation.validation_dataset={validation_file(tmp_path)}",
    ], max_envs_to_visit=250, validation_freq=50, checkpoint_dir="checkpoints",
        checkpoint_strategy="top_k_val", checkpoint_keep_last=3)
    ck = train(cfg).checkpoint_dir
    assert ck is not None
    lines = _saved_lines(caplog)
    assert len(lines) == 5
    assert not any("deleted" in x for x in lines[:3])
    assert lines[3].startswith("Checkpoint ep_000200 saved")
    assert lines[3].endswith(", deleted ep_000050")
    assert lines[4].endswith(", deleted ep_000150")
    assert _names(ck) == ["ep_000100", "ep_000200", "ep_000250"]
    assert [runtime_json(ck / n)["val_score"] for n in _names(ck)] == [0.52, 0.55, 0.51]


def test_checkpoint_on_start_writes_ep_000000(tmp_path: Path) -> None:
    """checkpoint_on_start creates ep_000000 with the initial (empty) memory."""
    ck = train(config(tmp_path, max_envs_to_visit=20, checkpoint_on_start=True)).checkpoint_dir
    assert ck is not None
    assert _names(ck) == ["ep_000000", "ep_000020"]
    rt = runtime_json(ck / "ep_000000")
    assert (rt["episode_index"], rt["train_steps_total"], rt["memory_entries"]) == (0, 0, 0)


def test_validation_baseline_scores_start_checkpoint(tmp_path: Path) -> None:
    """run_validation_at_start puts the baseline score in ep_000000."""
    ck = train(config(tmp_path, max_envs_to_visit=50, checkpoint_on_start=True,
                      run_validation_at_start=True, validation_freq=50,
                      checkpoint_every_episodes=50)).checkpoint_dir
    assert ck is not None
    assert _names(ck) == ["ep_000000", "ep_000050"]
    assert runtime_json(ck / "ep_000000")["val_score"] < runtime_json(ck / "ep_000050")["val_score"]


def test_final_checkpoint_written_once(tmp_path: Path) -> None:
    """A final checkpoint is written at the end unless the last episode was just saved."""
    result = train(config(tmp_path, max_envs_to_visit=130, checkpoint_every_episodes=50))
    assert result.checkpoint_dir is not None
    assert _names(result.checkpoint_dir) == ["ep_000050", "ep_000100", "ep_000130"]
    assert result.checkpoints_written == 3


def test_checkpointing_off(tmp_path: Path) -> None:
    """checkpoint_dir: null trains without writing checkpoints."""
    result = train(config(tmp_path, max_envs_to_visit=30, checkpoint_dir=None))
    assert result.checkpoint_dir is None
    assert os.listdir(result.run_dir) == ["config.yaml"]


def test_two_runs_in_the_same_second_get_distinct_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs started in the same second get ..._HHMMSS and ..._HHMMSS_1."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: object = None) -> Frozen:  # type: ignore[override]
            return cls(2024, 1, 15, 10, 30, 45)

    monkeypatch.setattr(layout_mod, "datetime", Frozen)
    cfg = config(tmp_path, "my_run", max_envs_to_visit=5)
    dirs = [train(cfg).run_dir.name for _ in range(2)]
    assert dirs == ["20240115_103045", "20240115_103045_1"]


def test_environment_skip_matches_running(tmp_path: Path) -> None:
    """Skipping N episodes leaves the task sequence where running N would."""
    env = ArithmeticEnvironment(EnvironmentConfig(seed=3))
    ran, skipped = env.sequence(), env.sequence()
    for _ in range(500):
        next(ran)
    skipped.skip(500)
    assert [next(ran) for _ in range(50)] == [next(skipped) for _ in range(50)]


@pytest.mark.anyio
async def test_resume_at_500_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Stopping at 500 and resuming to 1000 ends with byte-identical memory."""
    whole = await run_training(config(tmp_path, "whole", max_envs_to_visit=1000,
                                      checkpoint_every_episodes=500))
    stage1 = await run_training(config(tmp_path, "stage1", max_envs_to_visit=500,
                                       checkpoint_every_episodes=500))
    assert stage1.checkpoint_dir is not None
    assert whole.checkpoint_dir is not None
    resumed = await run_training(config(
        tmp_path, "stage2", max_envs_to_visit=1000, checkpoint_every_episodes=500,
        resume_from=str(stage1.checkpoint_dir / "ep_000500")))
    assert resumed.checkpoint_dir is not None
    a = (whole.checkpoint_dir / "ep_001000" / "memory_1000.jsonl").read_bytes()
    b = (resumed.checkpoint_dir / "ep_001000" / "memory_1000.jsonl").read_bytes()
    assert a == b
    assert resumed.train_steps_total == whole.train_steps_total
    assert _names(resumed.checkpoint_dir) == ["ep_001000"]


def test_resume_follows_what_happens(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Resume: counter set (not "Training restarts from episode 0"), new run dir, logged."""
    caplog.set_level(logging.INFO, "ckptwriter")
    stage1 = train(config(tmp_path, "my_run", max_envs_to_visit=500,
                          checkpoint_every_episodes=100))
    assert stage1.checkpoint_dir is not None
    src = stage1.checkpoint_dir / "ep_000500"
    resumed = train(config(tmp_path, "my_run", max_envs_to_visit=700,
                           checkpoint_every_episodes=100, resume_from=str(src)))
    assert resumed.checkpoint_dir is not None
    assert resumed.run_dir != stage1.run_dir
    assert resumed.run_dir.parent == stage1.run_dir.parent
    assert (resumed.first_episode, resumed.last_episode) == (500, 700)
    assert _names(resumed.checkpoint_dir) == ["ep_000600", "ep_000700"]
    rt = runtime_json(resumed.checkpoint_dir / "ep_000600")
    assert rt["resumed_from"] == str(src.resolve())
    assert rt["episode_index"] == 600
    assert f"Resuming from episode 500 (checkpoint {src})" in caplog.text


def test_resume_leaves_original_checkpoints_untouched(tmp_path: Path) -> None:
    """The resumed-from run is byte-for-byte (and mtime) unchanged."""
    stage1 = train(config(tmp_path, "my_run", max_envs_to_visit=200,
                          checkpoint_every_episodes=100))
    before = tree_digest(stage1.run_dir)
    train(config(tmp_path, "my_run", max_envs_to_visit=400, checkpoint_every_episodes=100,
                 checkpoint_keep_last=1, resume_from=str(stage1.run_dir / "checkpoints/latest")))
    assert tree_digest(stage1.run_dir) == before


def test_resume_without_max_trains_100_more(tmp_path: Path) -> None:
    """A resume snippet without max_envs_to_visit trains 100 more episodes."""
    stage1 = train(config(tmp_path, max_envs_to_visit=150))
    assert stage1.checkpoint_dir is not None
    resumed = train(config(tmp_path, resume_from=str(stage1.checkpoint_dir / "latest")))
    assert (resumed.first_episode, resumed.last_episode) == (150, 250)


def test_resume_past_max_is_a_config_error(tmp_path: Path) -> None:
    """Resuming at or beyond max_envs_to_visit says there is nothing to train."""
    stage1 = train(config(tmp_path, max_envs_to_visit=50))
    assert stage1.checkpoint_dir is not None
    cfg = config(tmp_path, "again", max_envs_to_visit=50,
                 resume_from=str(stage1.checkpoint_dir / "latest"))
    with pytest.raises(ConfigError, match=r"is at episode 50 and runtime\.max_envs_to_visit is "
                       r"50: nothing left to train\. Set max_envs_to_visit above 50"):
        train(cfg)
    assert not (tmp_path / "outputs" / "again").exists()


def test_resume_from_missing_checkpoint_lists_nearby(tmp_path: Path) -> None:
    """Troubleshooting "Checkpoint not found": names the path and lists what exists."""
    stage1 = train(config(tmp_path, "my_run", max_envs_to_visit=100,
                          checkpoint_every_episodes=50))
    assert stage1.checkpoint_dir is not None
    missing = stage1.checkpoint_dir / "ep_000500"
    with pytest.raises(CheckpointNotFoundError, match=(
        rf"^Checkpoint not found: {missing}\nCheckpoints that do exist nearby:\n"
        rf"  {stage1.checkpoint_dir}/ep_0001")):
        train(config(tmp_path, "r2", resume_from=str(missing), max_envs_to_visit=600))


def test_resume_memory_file_missing(tmp_path: Path) -> None:
    """Troubleshooting "Memory not restored": a missing snapshot file is named."""
    stage1 = train(config(tmp_path, max_envs_to_visit=100, checkpoint_every_episodes=100))
    assert stage1.checkpoint_dir is not None
    ckpt = stage1.checkpoint_dir / "ep_000100"
    (ckpt / "memory_100.jsonl").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"broken: memory_100\.jsonl: missing"):
        train(config(tmp_path, "r2", resume_from=str(ckpt), max_envs_to_visit=200))


def test_resume_memory_type_mismatch_names_both(tmp_path: Path) -> None:
    """Troubleshooting "Memory not restored": a memory type mismatch names both types."""
    stage1 = train(config(tmp_path, max_envs_to_visit=50))
    assert stage1.checkpoint_dir is not None
    cfg = config(tmp_path, "r2", ["agent.memory_type=vector"], max_envs_to_visit=100,
                 resume_from=str(stage1.checkpoint_dir / "latest"))
    with pytest.raises(MemoryTypeMismatchError, match=(
        r"^Memory not restored: checkpoint .* holds memory_type 'history' but the agent uses "
        r"memory_type 'vector'")):
        train(cfg)


def test_custom_agent_by_import_path(tmp_path: Path) -> None:
    """agent.type module:Class loads a user agent and records its type and config."""
    (tmp_path / "user_agents.py").write_text(
        "from ckptwriter.runtime import HistoryAgent\n"
        "class Mine(HistoryAgent):\n"
        "    def __init__(self, config, memory):\n"
        "        super().__init__({}, memory)\n"
        "        self.config = dict(config)\n"
    )
    cfg = config(tmp_path, overrides=["agent.type=user_agents:Mine", "agent.config={lr: 0.5}",
                                      "agent.memory_type=notes"], max_envs_to_visit=20)
    result = anyio_run_in(tmp_path, cfg)
    assert result.checkpoint_dir is not None
    loaded = load_checkpoint(result.checkpoint_dir / "latest", expected_memory_type="notes")
    assert (loaded.agent.agent_type, loaded.agent.config) == ("user_agents:Mine", {"lr": 0.5})
    assert loaded.runtime.agent_type == "user_agents:Mine"


def anyio_run_in(directory: Path, cfg: object) -> object:
    """Train with ``directory`` as the only extra place agent modules are looked up."""
    import anyio

    return anyio.run(lambda: run_training(cfg, search_dirs=(str(directory),)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("type_name", "needle"), [
    pytest.param("NoSuchAgent", r"is not a built-in agent \(HistoryAgent\) nor a "
                 r"'package\.module:ClassName'", id="unknown-name"),
    pytest.param("no_such_module_xyz:Agent", r"module 'no_such_module_xyz' cannot be imported",
                 id="no-module"),
    pytest.param("json:Nope", r"json has no class 'Nope'", id="no-class"),
    pytest.param("json:JSONDecoder", r"does not implement the agent protocol: act, observe, "
                 r"reflect must be async methods", id="not-an-agent"),
])
def test_bad_agent_type(type_name: str, needle: str) -> None:
    """A bad agent.type is a ConfigError saying what is wrong."""
    with pytest.raises(ConfigError, match=rf"^agent\.type '{re.escape(type_name)}'.*{needle}"):
        resolve_agent_class(type_name)


def test_history_agent_rejects_unknown_config(tmp_path: Path) -> None:
    """HistoryAgent validates agent.config before any episode."""
    cfg = config(tmp_path, overrides=["agent.config={lern: true}"], max_envs_to_visit=5)
    with pytest.raises(ConfigError,
                       match=r"run\.yaml: agent\.config\.lern: Extra inputs are not permitted"):
        train(cfg)
    assert not (tmp_path / "outputs").exists()


def test_unusable_checkpoint_dir_before_any_episode(tmp_path: Path) -> None:
    """A checkpoint_dir that is a file is a ConfigError raised before training."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = config(tmp_path, checkpoint_dir=str(blocker / "ckpts"), max_envs_to_visit=5)
    with pytest.raises(ConfigError, match=r"runtime\.checkpoint_dir .* is unusable"):
        train(cfg)


def test_every_checkpoint_verifies(tmp_path: Path) -> None:
    """Each checkpoint the runtime writes passes verify (sizes and sha256)."""
    ck = train(config(tmp_path, max_envs_to_visit=100, checkpoint_every_episodes=25,
                      fsync=False)).checkpoint_dir
    assert ck is not None
    for name in _names(ck):
        assert verify_checkpoint(ck / name).episode_index == int(name[3:])


def test_scripted_agent_is_a_history_agent() -> None:
    """The test helper agent keeps the HistoryAgent's training behaviour."""
    assert resolve_agent_class("_runtime_util:ScriptedAgent") is ScriptedAgent


def test_training_lowers_switch_interval_and_restores_it(tmp_path: Path) -> None:
    """The runtime opts into a 0.5 ms GIL switch interval while training, then restores it."""
    before = sys.getswitchinterval()
    IntervalAgent.seen.clear()
    train(config(tmp_path, overrides=["agent.type=_runtime_util:IntervalAgent"],
                 max_envs_to_visit=5))
    assert IntervalAgent.seen == {0.0005}
    assert sys.getswitchinterval() == before


def test_resume_with_another_agent_type_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Resuming a HistoryAgent checkpoint with another agent is allowed, with a warning."""
    stage1 = train(config(tmp_path, max_envs_to_visit=20))
    assert stage1.checkpoint_dir is not None
    caplog.set_level(logging.INFO, "ckptwriter")
    train(config(tmp_path, "r2", ["agent.type=_runtime_util:IntervalAgent"],
                 resume_from=str(stage1.checkpoint_dir / "latest")))
    assert ("The checkpoint was written by agent HistoryAgent; continuing with agent "
            "_runtime_util:IntervalAgent") in caplog.text
