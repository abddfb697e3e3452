"""Crash torture: ``ckptwriter train`` checkpointing every episode, SIGKILLed at random
moments, resumed each time, until a last uninterrupted run reaches the end.

Runs are forked from a warm interpreter (``_fault_util.py zygote``) that runs
``ckptwriter.cli.main(["train", ...])``, so a kill costs no interpreter start-up; the
writer process of the default ``executor: auto`` is still a fresh interpreter, as in
production. One test also drives the real ``ckptwriter`` console script.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from _fault_util import HERE, PY, leftovers
from _live_reader import LiveReader
from _s3_util import make_backend, s3_endpoint  # noqa: F401 -- fixture
from ckptwriter import (
    CheckpointFallbackWarning,
    DirectoryLockedError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from ckptwriter.storage import LocalStorage
from conftest import open_dir

# The episode the killed runs are given as their end: never reached (a killed run gets a
# few episodes further than the one it resumed from).
EPISODES = 3000
# Episodes the last, uninterrupted run of a chain trains past the newest checkpoint its
# kills left (its end, and the reference run's, follow from where the kills got to).
TAIL = 50
# Seconds one kill-and-resume round may take before it counts as a hang (a round takes
# well under a second on an idle machine; the margin is for a loaded one).
_ROUND_TIMEOUT = 600
CKPT_CLI = Path(PY).with_name("ckptwriter")


def _write_config(path: Path, out: Path, name: str, episodes: int = EPISODES,
                  **runtime: object) -> Path:
    lines = [f"run_name: {name}", f"output_dir: {out}", "runtime:",
             f"  max_envs_to_visit: {episodes}", "  checkpoint_dir: checkpoints",
             "  checkpoint_every_episodes: 1"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in runtime.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Zygote:
    """A warm interpreter that forks training runs and kills them on request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([PY, str(HERE), "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def send(self, req: dict[str, object]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"zygote died (exit {self.proc.poll()})"
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def zygotes() -> Iterator[Callable[[int], list[Zygote]]]:
    """Zygotes on request (one per chain of kills), closed after the test."""
    zs: list[Zygote] = []

    def start(n: int) -> list[Zygote]:
        zs.extend(Zygote() for _ in range(n))
        return zs[-n:]

    yield start
    for z in zs:
        z.close()


@dataclass
class Chain:
    """One sequence of kill-and-resume rounds in its own outputs directory."""

    name: str
    config: Path
    runs: Path
    kills: int
    zygote: Zygote
    log: Path
    rounds: int = 0
    finishing: bool = False
    resumable: bool = False
    killed_dirs: list[Path] = field(default_factory=list)
    leftovers_seen: int = 0
    final: dict[str, object] | None = None
    end: int = 0  # the episode the last, uninterrupted run trains to
    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0

    def request(self, *, kill: bool, seed: int) -> dict[str, object]:
        argv = ["train", "--config", str(self.config), "--quiet"]
        if self.resumable:
            # outputs/<run_name>: resume picks the newest run with a complete checkpoint.
            argv += ["--set", f"runtime.resume_from={self.runs}"]
        return {"argv": argv, "runs": str(self.runs), "kill": kill, "max_delay": 0.025,
                "seed": f"{self.name}-{seed}", "log": str(self.log)}


def _reopen(ckpts: Path) -> None:
    """Start (and stop) a writer on a killed run's directory, as a restart would."""
    # A hang guard, not a speed limit: a killed writer is normally gone in milliseconds.
    deadline = time.monotonic() + 120
    while True:
        storage = LocalStorage(ckpts)
        try:
            open_dir(storage)
        except DirectoryLockedError:
            # The killed run's writer process is being reaped (PDEATHSIG): a moment.
            assert time.monotonic() < deadline, "lock never released after SIGKILL"
            time.sleep(0.005)
            continue
        storage.close()
        return


def _check_after_kill(chain: Chain, reply: dict[str, object]) -> None:
    """Everything the issue promises after a kill -9."""
    assert reply["killed"], f"{chain.name}: the run was not killed: {reply}"
    if reply["checkpoints"] is None:
        return  # killed before it created its run directory
    ckpts = Path(str(reply["checkpoints"]))
    eps = list_checkpoints(ckpts)
    # `ckptwriter verify <checkpoints dir>` checks every ep_* and that latest resolves.
    if eps:
        assert reply["verify_exit"] == 0, reply["verify_out"]
        assert all(i.complete for i in eps)
        chain.resumable = True
        chain.killed_dirs.append(ckpts)
    else:
        # Killed during its first commit: nothing to verify, and verify says so.
        assert reply["verify_exit"] == 1, reply
        out = str(reply["verify_out"])
        assert "no checkpoints found" in out or "Checkpoint not found" in out, out
    if os.path.islink(ckpts / "latest"):
        verify_checkpoint(ckpts / os.readlink(ckpts / "latest"))  # never dangles
    chain.leftovers_seen += len(leftovers(ckpts))
    _reopen(ckpts)
    assert leftovers(ckpts) == []
    # ... and the start that removed them left every ep_* complete (a half-removed
    # trash directory must not come back as a checkpoint).
    assert [(i.name, i.problem) for i in list_checkpoints(ckpts) if not i.complete] == []


def _drive(chains: list[Chain]) -> None:
    """Run the chains' rounds concurrently (one zygote each), checking after every kill."""
    sel = selectors.DefaultSelector()
    for c in chains:
        assert c.zygote.proc.stdout is not None
        sel.register(c.zygote.proc.stdout, selectors.EVENT_READ, c)
        c.zygote.send(c.request(kill=True, seed=0))
    active = len(chains)
    while active:
        events = sel.select(timeout=_ROUND_TIMEOUT)
        assert events, f"no run ended in {_ROUND_TIMEOUT} s: a hang"
        for key, _ in events:
            c: Chain = key.data
            reply = c.zygote.receive()
            if c.finishing:
                c.final = reply
                c.finished = time.monotonic()
                sel.unregister(key.fileobj)
                active -= 1
                continue
            _check_after_kill(c, reply)
            c.rounds += 1
            if c.rounds < c.kills:
                c.zygote.send(c.request(kill=True, seed=c.rounds))
            else:
                # The last run resumes and trains TAIL episodes past the newest
                # checkpoint the kills left, without interruption (no fsync: durability
                # is not what it checks, the final memory is).
                c.finishing = True
                reached = max((i.episode_index for d in c.killed_dirs
                               for i in list_checkpoints(d)), default=0)
                c.end = reached + TAIL
                req = c.request(kill=False, seed=-1)
                req["argv"] = [*req["argv"], "--set", "runtime.fsync=false",  # type: ignore[list-item]
                               "--set", f"runtime.max_envs_to_visit={c.end}"]
                c.zygote.send(req)
    sel.close()


def _memory_bytes(ckpt: Path) -> tuple[int, bytes]:
    rt = verify_checkpoint(ckpt)
    return rt.episode_index, (ckpt / rt.memory_snapshot_path).read_bytes()


def _torture(tmp_path: Path, start_zygotes: Callable[[int], list[Zygote]],
             kills: dict[str, tuple[str, int]]) -> list[Chain]:
    """Chains of kills, run at once: {name: (executor, kills)}, then the checks."""
    chains = [
        Chain(name, _write_config(tmp_path / f"{name}.yaml", tmp_path / "out", name, EPISODES,
                                  checkpoint_keep_last=3, executor=executor),
              tmp_path / "out" / name, n, zygote, tmp_path / f"{name}.log")
        for (name, (executor, n)), zygote in zip(kills.items(), start_zygotes(len(kills)),
                                                  strict=True)
    ]
    _drive(chains)
    zygote = chains[-1].zygote
    # The uninterrupted reference run, to the farthest end of the chains (the memory of
    # an episode does not depend on the run's end: the task sequence is the same).
    ref_end = max(c.end for c in chains)
    ref_cfg = _write_config(tmp_path / "reference.yaml", tmp_path / "ref", "reference",
                            ref_end, fsync=False, executor="thread")
    zygote.send({"argv": ["train", "--config", str(ref_cfg), "--quiet"],
                 "runs": str(tmp_path / "ref" / "reference"), "kill": False,
                 "max_delay": 0, "seed": "ref", "log": str(tmp_path / "ref.log")})
    ref_reply = zygote.receive()
    assert ref_reply["exit"] == 0, (tmp_path / "ref.log").read_text()
    ref = Path(str(ref_reply["checkpoints"]))
    for c in chains:
        assert c.final is not None
        assert c.final["exit"] == 0, c.log.read_text()[-3000:]
        # Every killed run's surviving checkpoints hold exactly the reference's bytes.
        for ckpts in c.killed_dirs:
            for info in list_checkpoints(ckpts):
                ep, data = _memory_bytes(info.path)
                assert data == _memory_bytes(ref / info.name)[1], info.path
        final = Path(str(c.final["checkpoints"]))
        ep, data = _memory_bytes(resolve_checkpoint(final / "latest"))
        assert (ep, data) == _memory_bytes(ref / f"ep_{c.end:06d}")
        assert load_checkpoint(final).runtime.train_steps_total == (
            load_checkpoint(ref / f"ep_{c.end:06d}").runtime.train_steps_total
        )
    return chains


def test_kill9_torture_50_kills(
    tmp_path: Path, zygotes: Callable[[int], list[Zygote]]
) -> None:
    """50 SIGKILLs of `ckptwriter train` mid-checkpoint: always verifiable, same end on resume."""
    # A writer-process run costs an interpreter start (~0.4 s); a thread run does not.
    chains = _torture(tmp_path, zygotes, {"p": ("auto", 12), "t": ("thread", 38)})
    for c in chains:
        print(f"{c.name}: {c.rounds} kills, {len(c.killed_dirs)} left checkpoints, "
              f"{c.leftovers_seen} temp/trash entries cleaned, {c.finished - c.started:.1f} s")
    assert sum(c.rounds for c in chains) >= 50
    # Kills did land mid-commit: some runs left temp or trash entries to clean up.
    assert sum(c.leftovers_seen for c in chains) > 0


@pytest.mark.slow
# Bounded by work (kills, episodes); the timeout only catches a hang, so it is far above
# what a loaded 2-core machine takes.
@pytest.mark.timeout(3600)
def test_kill9_torture_400_kills(
    tmp_path: Path, zygotes: Callable[[int], list[Zygote]]
) -> None:
    """400 SIGKILLs (slow suite): the same promises over many more crash points."""
    # 150 kills of writer-process runs in two chains of 75 beside the 250 thread kills: a
    # process round costs about three thread rounds (its writer's interpreter start), so
    # the three chains end together instead of one 150-round chain ending last.
    chains = _torture(tmp_path, zygotes, {"p": ("auto", 75), "p2": ("auto", 75),
                                          "t": ("thread", 250)})
    for c in chains:
        print(f"{c.name}: {c.rounds} kills, {len(c.killed_dirs)} left checkpoints, "
              f"{c.leftovers_seen} temp/trash entries cleaned, {c.finished - c.started:.1f} s")
    assert sum(c.rounds for c in chains) >= 400


# -- the real console script -----------------------------------------------------------


def test_kill9_real_console_script(tmp_path: Path) -> None:
    """`ckptwriter train` as installed, SIGKILLed; `ckptwriter verify` passes; resume ends."""
    cfg = _write_config(tmp_path / "c.yaml", tmp_path / "out", "real", 60,
                        checkpoint_keep_last=3, fsync=False)
    runs = tmp_path / "out" / "real"
    rng = random.Random(5)
    for i in range(1):  # the volume is in the forked torture above; this is the real binary
        argv = [str(CKPT_CLI), "train", "--config", str(cfg), "-q"]
        if i:
            argv += ["--set", f"runtime.resume_from={runs}"]
        before = set(runs.iterdir()) if runs.exists() else set()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _ROUND_TIMEOUT  # a hang guard only
        while not (new := [d for d in runs.glob("*") if d not in before
                           and list(d.glob("checkpoints/ep_*"))]):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        proc.kill()
        proc.wait()
        res = subprocess.run([str(CKPT_CLI), "verify", str(new[0] / "checkpoints")],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.rstrip().endswith("checkpoints OK")
    res = subprocess.run(
        [str(CKPT_CLI), "train", "--config", str(cfg), "-q", "--set",
         f"runtime.resume_from={runs}"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "Finished at episode 60/60" in res.stdout


# -- found by the torture: resume from outputs/<run_name> picks the newest run ---------


def test_resume_from_run_name_picks_newest_of_same_second(tmp_path: Path) -> None:
    """Runs started in one second (_1.._10): outputs/<run_name> resumes the newest, not _9."""
    from _fault_util import build_checkpoints

    runs = tmp_path / "outputs" / "r"
    src = tmp_path / "src"
    build_checkpoints(src, 11, executor="thread")
    for n in range(11):
        name = "20260101_000000" + (f"_{n}" if n else "")
        (runs / name / "checkpoints").mkdir(parents=True)
        ep = f"ep_{n + 1:06d}"
        shutil.copytree(src / ep, runs / name / "checkpoints" / ep)
        (runs / name / "checkpoints" / "latest").symlink_to(ep)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointFallbackWarning)
        assert resolve_checkpoint(runs) == runs / "20260101_000000_10" / "checkpoints" / "ep_000011"


# -- a reader process polling latest through the kills ---------------------------------

TORTURE_RUNS = HERE.with_name("_torture_runs.py")


class Runs:
    """A warm interpreter forking `ckptwriter train` runs, each SIGKILLed (with its writer
    process) once it has saved a given number of checkpoints (tests/_torture_runs.py)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([PY, str(TORTURE_RUNS)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], *, kill_after: int, delay: float,
            log: Path) -> dict[str, object]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        req = {"argv": argv, "kill_after": kill_after, "delay": delay, "log": str(log)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the run server died (exit {self.proc.poll()}); see {log}"
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@dataclass
class Place:
    """Where the chain's runs checkpoint, and what stands in for a dead writer's lock TTL."""

    url: str
    after_kill: Callable[[], None]
    delay: float  # upper bound of the random delay after the k-th save (S3 commits are slower)
    kills: int  # at least this many kills (a round on S3 costs seconds, locally < 1 s)


@pytest.fixture(params=[pytest.param("local", id="local"),
                        pytest.param("s3", id="s3", marks=pytest.mark.s3)])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    """One checkpoints location every run of the chain writes into and resumes from."""
    backend = make_backend(str(request.param), tmp_path, request)
    if backend.fs is None:
        return Place(str(Path(backend.url).resolve()), lambda: None, 0.03, 12)

    def expire_lock() -> None:
        # A SIGKILLed writer's lock object outlives it until its TTL (60 s): removing it
        # once no process of the killed run is left is what the TTL would do, sooner.
        with contextlib.suppress(FileNotFoundError):
            backend.fs.rm_file(f"{backend.root}/.lock")

    return Place(backend.url, expire_lock, 0.15, 8)


def _live_config(path: Path, out: Path, url: str) -> Path:
    path.write_text("\n".join([
        "run_name: live", f"output_dir: {out}", "runtime:",
        # Far beyond what the killed runs reach (a few episodes each): only the last run
        # is given an end; a run that is never killed ends here and fails the test.
        "  max_envs_to_visit: 2000", f"  checkpoint_dir: {url}",
        "  checkpoint_every_episodes: 1",
        # Each commit retires the checkpoint latest named a moment ago.
        "  checkpoint_keep_last: 1",
    ]) + "\n")
    return path


# Bounded by work; the timeout catches a hang only (about 10 s locally, 40 s on S3, on
# an idle 2-core machine).
@pytest.mark.timeout(1200)
def test_kill9_torture_with_a_reader_process(tmp_path: Path, place: Place) -> None:
    """Runs SIGKILLed mid-checkpoint and resumed in place while another process loads
    latest in a loop: every load a whole checkpoint, no error, no fallback warning, and
    the episode the reader sees never goes back."""
    cfg = _live_config(tmp_path / "live.yaml", tmp_path / "out", place.url)
    latest = f"{place.url}/latest"
    log = tmp_path / "runs.log"
    rng = random.Random(10)
    # Bounded by work: at least min_kills kills and min_loads loads (the cap only ends a
    # reader that stopped loading).
    min_kills, min_loads, max_kills = place.kills, 30, 200
    t0 = time.monotonic()
    runs = Runs()
    reader: LiveReader | None = None
    kills, after_kill = 0, 0
    try:
        while kills < max_kills and (kills < min_kills or reader is None
                                     or reader.loads < min_loads):
            argv = ["train", "--config", str(cfg)]
            if kills:
                argv += ["--set", f"runtime.resume_from={latest}"]
            reply = runs.run(argv, kill_after=rng.randint(1, 3),
                             delay=rng.uniform(0, place.delay), log=log)
            assert reply["killed"], (reply, log.read_text()[-3000:])
            kills += 1
            place.after_kill()
            # What latest names after a kill is whole, and never older than after the
            # previous kill.
            with warnings.catch_warnings():
                warnings.simplefilter("error", CheckpointFallbackWarning)
                ep = load_checkpoint(latest).runtime.episode_index
            assert ep >= after_kill
            after_kill = ep
            if reader is None:
                reader = LiveReader(latest)
        end = after_kill + 10
        reply = runs.run(["train", "--config", str(cfg), "--set", f"runtime.resume_from={latest}",
                          "--set", f"runtime.max_envs_to_visit={end}"],
                         kill_after=0, delay=0, log=log)
        assert reply["exit"] == 0, log.read_text()[-3000:]
    finally:
        runs.close()
        tally = reader.stop() if reader is not None else None
    assert tally is not None
    print(f"{place.url}: {kills} kills, {tally.loads} loads by the reader process, "
          f"{time.monotonic() - t0:.1f} s")
    assert (tally.errors, tally.warnings) == ([], [])
    assert tally.loads >= min_loads
    assert tally.episodes == sorted(tally.episodes)
    final = load_checkpoint(latest)
    assert final.runtime.episode_index == end
    assert [i.name for i in list_checkpoints(place.url)] == [f"ep_{end:06d}"]
