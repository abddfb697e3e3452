"""config.yaml records the configuration a run actually used, defaults filled in."""

from __future__ import annotations

from pathlib import Path

import yaml

from _runtime_util import config, train


def test_config_yaml_records_effective_defaults(tmp_path: Path) -> None:
    """Episodes and strategy chosen by default appear in config.yaml, not null."""
    result = train(config(tmp_path, checkpoint_keep_last=2, checkpoint_every_episodes=50))
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["runtime"]["max_envs_to_visit"] == 100
    assert saved["runtime"]["checkpoint_strategy"] == "last_n"


def test_resumed_run_records_its_target_episode(tmp_path: Path) -> None:
    """A resume without max_envs_to_visit records where it trains to (100 past the start)."""
    first = train(config(tmp_path, "a", max_envs_to_visit=30))
    assert first.checkpoint_dir is not None
    second = train(config(tmp_path, "b", resume_from=str(first.checkpoint_dir / "latest")))
    saved = yaml.safe_load((second.run_dir / "config.yaml").read_text())
    assert saved["runtime"]["max_envs_to_visit"] == 130
    assert saved["runtime"]["checkpoint_strategy"] == "all"
