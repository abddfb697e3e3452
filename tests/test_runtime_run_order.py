"""Which run is the newest, which checkpoint a run starts from, and hostile datasets."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path

import pytest

from _runtime_util import config, train
from ckptwriter import ConfigError, list_checkpoints, load_checkpoint
from ckptwriter import layout as layout_mod
from ckptwriter.config import EnvironmentConfig, ValidationConfig
from ckptwriter.runtime import ArithmeticEnvironment, load_validation_dataset

_UTC = timezone.utc
# Central Europe on 27 October 2024: summer time (+2) ends at 01:00 UTC, when local
# clocks go from 03:00 back to 02:00.
_DST_END = datetime(2024, 10, 27, 1, 0, tzinfo=_UTC)


def _berlin(instant: datetime) -> datetime:
    """Local (naive) time in Central Europe, as datetime.now() would give it there."""
    offset = timedelta(hours=2 if instant < _DST_END else 1)
    return (instant + offset).replace(tzinfo=None)


def _clock(monkeypatch: pytest.MonkeyPatch, instants: list[datetime]) -> None:
    """The run directory's clock: each call takes the next instant (UTC)."""
    ticks = iter(instants)

    class Clock(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Clock:  # type: ignore[override]
            t = next(ticks)
            local = t.astimezone(tz) if tz is not None else _berlin(t)
            return cls.fromisoformat(local.isoformat())

    monkeypatch.setattr(layout_mod, "datetime", Clock)


@pytest.mark.parametrize("instants", [
    # 02:30 summer time, then 02:10 winter time: 40 minutes later, an earlier local time.
    pytest.param([datetime(2024, 10, 27, 0, 30, tzinfo=_UTC),
                  datetime(2024, 10, 27, 1, 10, tzinfo=_UTC)], id="dst-end"),
    # The clock was a minute fast and NTP stepped it back between the two runs.
    pytest.param([datetime(2024, 3, 5, 12, 0, 0, tzinfo=_UTC),
                  datetime(2024, 3, 5, 11, 59, 0, tzinfo=_UTC)], id="ntp-step-back"),
    # The same second twice, then an earlier one: the order still follows the starts.
    pytest.param([datetime(2024, 3, 5, 12, 0, 0, tzinfo=_UTC)] * 2
                 + [datetime(2024, 3, 5, 11, 0, 0, tzinfo=_UTC)], id="same-second-then-back"),
])
def test_resume_from_run_name_takes_the_run_started_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instants: list[datetime]
) -> None:
    """A clock that goes back between runs: resume_from outputs/<run_name> takes the last run."""
    _clock(monkeypatch, [*instants, instants[0] + timedelta(days=1)])
    runs = [train(config(tmp_path, "r", max_envs_to_visit=10 * (i + 1),
                         checkpoint_every_episodes=5)) for i in range(len(instants))]
    names = sorted((r.run_dir.name for r in runs), key=layout_mod.run_sort_key)
    assert names == [r.run_dir.name for r in runs]
    resumed = train(config(tmp_path, "r", max_envs_to_visit=100,
                           resume_from=str(tmp_path / "outputs" / "r")))
    assert resumed.first_episode == 10 * len(instants)
    last = runs[-1].checkpoint_dir
    assert last is not None
    assert resumed.resumed_from == str((last / f"ep_{10 * len(instants):06d}").resolve())


def test_run_directory_names_are_utc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stamp is UTC, as the YYYYmmdd_HHMMSS the guide shows, whatever the local zone."""
    _clock(monkeypatch, [datetime(2024, 1, 15, 10, 30, 45, tzinfo=_UTC)])
    assert layout_mod.create_run_dir(tmp_path, "r").name == "20240115_103045"


def test_a_run_named_by_local_time_before_still_sorts_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old run named in local time east of UTC: the next (UTC) run still sorts after it."""
    (tmp_path / "r" / "20240115_113000").mkdir(parents=True)  # 10:30 UTC, named at +1
    _clock(monkeypatch, [datetime(2024, 1, 15, 10, 45, tzinfo=_UTC),
                         datetime(2024, 1, 15, 11, 45, tzinfo=_UTC)])
    assert layout_mod.create_run_dir(tmp_path, "r").name == "20240115_113000_1"
    assert layout_mod.create_run_dir(tmp_path, "r").name == "20240115_114500"


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_resume_in_place_with_checkpoint_on_start_keeps_the_checkpoint(
    tmp_path: Path, executor: str
) -> None:
    """Continuing a run in its own directory does not commit the episode it resumed from again."""
    shared = tmp_path / "shared"
    train(config(tmp_path, "a", checkpoint_dir=str(shared), max_envs_to_visit=40,
                 checkpoint_every_episodes=20, executor=executor))
    before = os.stat(shared / "ep_000040" / "runtime.json")
    text = (shared / "ep_000040" / "runtime.json").read_bytes()
    result = train(config(tmp_path, "a2", checkpoint_dir=str(shared), max_envs_to_visit=60,
                          checkpoint_every_episodes=20, checkpoint_on_start=True,
                          resume_from=str(shared / "latest"), executor=executor))
    after = os.stat(shared / "ep_000040" / "runtime.json")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (shared / "ep_000040" / "runtime.json").read_bytes() == text
    assert [c.name for c in list_checkpoints(shared)] == ["ep_000020", "ep_000040", "ep_000060"]
    assert result.checkpoints_written == 1
    assert load_checkpoint(shared / "latest").runtime.episode_index == 60


def test_resume_into_a_new_directory_still_writes_the_start_checkpoint(tmp_path: Path) -> None:
    """checkpoint_on_start in a new run directory writes the starting episode there."""
    first = train(config(tmp_path, "a", max_envs_to_visit=40, checkpoint_every_episodes=20))
    assert first.checkpoint_dir is not None
    result = train(config(tmp_path, "b", max_envs_to_visit=60, checkpoint_every_episodes=20,
                          checkpoint_on_start=True,
                          resume_from=str(first.checkpoint_dir / "latest")))
    assert result.checkpoint_dir is not None
    assert [c.name for c in list_checkpoints(result.checkpoint_dir)] == ["ep_000040",
                                                                        "ep_000060"]


def test_validation_line_nested_too_deeply_is_a_config_error(tmp_path: Path) -> None:
    """A hostile validation line ("[[[[...") is named, not a RecursionError."""
    path = tmp_path / "val.jsonl"
    path.write_text('{"question": "Solve: 1+1=?", "answer": "2"}\n' + "[" * 100_000 + "\n")
    env = ArithmeticEnvironment(EnvironmentConfig())
    with pytest.raises(ConfigError, match=rf"^validation\.validation_dataset {path}: line 2 is "
                                          r"nested too deeply"):
        load_validation_dataset(ValidationConfig(validation_dataset=str(path)), env)
