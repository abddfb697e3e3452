"""Runs that share an absolute checkpoint_dir never mix their histories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _runtime_util import config, train, tree_digest
from ckptwriter import ConfigError, list_checkpoints


def _names(d: Path) -> list[str]:
    return [i.name for i in list_checkpoints(d)]


def test_second_run_into_a_used_dir_is_refused(tmp_path: Path) -> None:
    """A new run into a directory holding another run's checkpoints is refused untouched."""
    shared = tmp_path / "shared"
    train(config(tmp_path, "a", checkpoint_dir=str(shared), max_envs_to_visit=40,
                 checkpoint_every_episodes=20))
    before = tree_digest(shared)
    with pytest.raises(ConfigError, match=r"already holds checkpoints of another run "
                                          r"\(ep_000020 \.\. ep_000040\)"):
        train(config(tmp_path, "b", checkpoint_dir=str(shared), max_envs_to_visit=10))
    assert tree_digest(shared) == before
    assert not (tmp_path / "outputs" / "b").exists() or not os.listdir(tmp_path / "outputs" / "b")


def test_resume_in_place_from_the_newest_is_allowed(tmp_path: Path) -> None:
    """Continuing a run in its own directory from its newest checkpoint works."""
    shared = tmp_path / "shared"
    train(config(tmp_path, "a", checkpoint_dir=str(shared), max_envs_to_visit=40,
                 checkpoint_every_episodes=20))
    train(config(tmp_path, "a2", checkpoint_dir=str(shared), max_envs_to_visit=60,
                 checkpoint_every_episodes=20, resume_from=str(shared / "latest")))
    assert _names(shared) == ["ep_000020", "ep_000040", "ep_000060"]
    assert os.readlink(shared / "latest") == "ep_000060"


def test_resume_in_place_from_an_older_checkpoint_is_refused(tmp_path: Path) -> None:
    """Resuming from an older checkpoint into its own directory would mix two histories."""
    shared = tmp_path / "shared"
    train(config(tmp_path, "a", checkpoint_dir=str(shared), max_envs_to_visit=40,
                 checkpoint_every_episodes=20))
    with pytest.raises(ConfigError, match=r"holds ep_000040, later than the checkpoint you "
                                          r"resume from \(ep_000020\)"):
        train(config(tmp_path, "a2", checkpoint_dir=str(shared), max_envs_to_visit=60,
                     resume_from=str(shared / "ep_000020")))
    assert os.readlink(shared / "latest") == "ep_000040"
