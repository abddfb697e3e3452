"""A preemptible job: SIGTERM, then the same command again, five times (resume_from: auto).

Real processes and real signals: each attempt is ``python -m ckptwriter train`` sent
SIGTERM once it has written a checkpoint of its own; the sixth runs to the end. The chain
must end with the memory of an uninterrupted run, byte for byte, in one run directory
whose checkpoints never exceed ``checkpoint_keep_last``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _runtime_util import config, train

EPISODES = 1000
KEEP = 3
# Each act sleeps: an attempt cannot run to the end (>= EPISODES * 2 ms) in the moment
# between its checkpoint appearing and the signal, however fast the machine is.
_AGENT = '''
import anyio
from ckptwriter.runtime import HistoryAgent


class SleepyAgent(HistoryAgent):
    async def act(self, observation):
        await anyio.sleep(0.002)
        return await super().act(observation)
'''
_CONFIG = f"""run_name: job
runtime:
  max_envs_to_visit: {EPISODES}
  checkpoint_every_episodes: 20
  checkpoint_keep_last: {KEEP}
  resume_from: auto
  executor: thread
agent:
  type: sleepy_h7:SleepyAgent
"""


def _latest(ckpts: Path) -> int:
    try:
        return int(json.loads((ckpts / "latest.json").read_text())["episode_index"])
    except (OSError, ValueError, KeyError):
        return -1


def _attempt(tmp_path: Path, cfg: Path, after: int | None) -> tuple[int, str]:
    """One attempt; SIGTERM once it committed a checkpoint past ``after`` (None: no signal)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptwriter", "train", "--config", str(cfg), "-q"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    if after is not None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            runs = (tmp_path / "outputs" / "job").glob("*/checkpoints")
            if any(_latest(c) > after for c in runs):
                os.killpg(proc.pid, signal.SIGTERM)
                break
            time.sleep(0.01)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def test_five_preemptions_end_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """SIGTERM + rerun five times: same final memory as one run, bounded checkpoints."""
    (tmp_path / "sleepy_h7.py").write_text(_AGENT)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(_CONFIG)
    stops: list[int] = []
    after = -1
    for _ in range(5):
        rc, text = _attempt(tmp_path, cfg, after)
        assert rc == 143, text
        [run] = (tmp_path / "outputs" / "job").iterdir()  # one run directory, always
        ckpts = run / "checkpoints"
        names = sorted(n for n in os.listdir(ckpts) if n.startswith("ep_"))
        assert len(names) <= KEEP, names
        assert not [n for n in os.listdir(ckpts) if n.startswith(".tmp")]
        after = _latest(ckpts)
        assert after > (stops[-1] if stops else 0)
        stops.append(after)
    rc, text = _attempt(tmp_path, cfg, None)
    assert rc == 0, text
    assert f"Finished at episode {EPISODES}/{EPISODES}" in text
    [run] = (tmp_path / "outputs" / "job").iterdir()
    ckpts = run / "checkpoints"
    assert len([n for n in os.listdir(ckpts) if n.startswith("ep_")]) <= KEEP
    (tmp_path / "ref").mkdir()
    whole = train(config(tmp_path / "ref", "whole", max_envs_to_visit=EPISODES,
                         checkpoint_every_episodes=EPISODES))
    assert whole.checkpoint_dir is not None
    final = f"ep_{EPISODES:06d}"
    mem = f"memory_{EPISODES}.jsonl"
    assert (ckpts / final / mem).read_bytes() == (whole.checkpoint_dir / final / mem).read_bytes()
    chained = json.loads((ckpts / final / "runtime.json").read_text())
    assert chained["train_steps_total"] == whole.train_steps_total
    # Every attempt stopped at a checkpoint the next one resumed: five distinct pieces.
    assert len(set(stops)) == 5
