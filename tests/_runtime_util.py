"""Helpers for the runtime, CLI and example tests: configs, runs, tree hashes, agents."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import yaml

from ckptwriter import MemoryLog
from ckptwriter.cli import main
from ckptwriter.config import Config, load_config
from ckptwriter.runtime import HistoryAgent, TrainResult, run_training
from ckptwriter.runtime.environments import parse_task

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
GUIDE_RUN = "20240115_103045"


def write_config(directory: Path, name: str, data: Mapping[str, Any] | str) -> Path:
    """Write a YAML config file ``<name>.yaml`` and return its path."""
    path = directory / f"{name}.yaml"
    text = data if isinstance(data, str) else yaml.safe_dump(dict(data), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def config(directory: Path, name: str = "run", overrides: Sequence[str] = (),
           **runtime: Any) -> Config:
    """A loaded config with ``output_dir`` inside ``directory`` and the given runtime keys.

    The writer runs in a thread unless ``executor`` is given: a writer process costs
    ~0.2 s of interpreter start per run, and the example tests cover the default.
    """
    runtime.setdefault("executor", "thread")
    data: dict[str, Any] = {"output_dir": str(directory / "outputs"), "runtime": runtime}
    return load_config(write_config(directory, name, data), overrides)


def train(cfg: Config) -> TrainResult:
    """Run a training to the end on asyncio (for sync tests and fixtures)."""
    return anyio.run(lambda: run_training(cfg))


def cli(argv: Sequence[str], cwd: Path) -> int:
    """Run the CLI in-process from ``cwd`` (restoring the working directory after)."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return main(list(argv))
    finally:
        os.chdir(old)


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root``: file sha256, symlink target or "dir" (mtimes too)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = f"dir {st.st_mtime_ns}"
            else:
                out[rel] = f"{hashlib.sha256(p.read_bytes()).hexdigest()} {st.st_mtime_ns}"
    return out


def make_guide_run(base: Path, run_name: str, episodes: int, every: int) -> Path:
    """A finished run renamed to the guide's ``outputs/<run_name>/20240115_103045/``."""
    cfg = config(base, run_name, max_envs_to_visit=episodes, checkpoint_dir="checkpoints",
                 checkpoint_every_episodes=every)
    result = train(cfg)
    target = result.run_dir.parent / GUIDE_RUN
    result.run_dir.rename(target)
    return target


def copy_outputs(src: Path, dst: Path) -> None:
    """Copy an ``outputs/`` tree, keeping ``latest`` symlinks as symlinks."""
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


def runtime_json(ckpt: Path) -> dict[str, Any]:
    """The parsed runtime.json of a checkpoint directory."""
    data: dict[str, Any] = json.loads((ckpt / "runtime.json").read_text())
    return data


def validation_file(directory: Path, size: int = 100) -> Path:
    """A JSONL validation dataset whose questions never occur in training (a >= 1000)."""
    path = directory / "val.jsonl"
    lines = [json.dumps({"question": f"Solve: 1000+{i}=?", "answer": str(1000 + i)})
             for i in range(size)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class ScriptedAgent(HistoryAgent):
    """A HistoryAgent whose validation scores follow ``config["scores"]`` round by round.

    Validation questions are ``Solve: 1000+i=?`` (see :func:`validation_file`); in round
    r it answers the first ``scores[r] * size`` of them correctly.
    """

    def __init__(self, config: Mapping[str, Any], memory: MemoryLog) -> None:
        super().__init__({}, memory)
        self.config = dict(config)
        self._scores = [float(s) for s in config["scores"]]
        self._size = int(config.get("size", 100))
        self._round = -1

    async def act(self, observation: str) -> str:
        parsed = parse_task(observation)
        if parsed is None or parsed[0] < 1000:
            return await super().act(observation)
        a, _, i = parsed
        if i == 0:
            self._round += 1
        right = i < round(self._scores[self._round] * self._size)
        return str(a + i) if right else "wrong"


class IntervalAgent(HistoryAgent):
    """A HistoryAgent that records the GIL switch interval it acts under."""

    seen: ClassVar[set[float]] = set()

    async def act(self, observation: str) -> str:
        IntervalAgent.seen.add(sys.getswitchinterval())
        return await super().act(observation)
