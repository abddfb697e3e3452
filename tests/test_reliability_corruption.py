"""Damaged checkpoints and hostile manifests, read the way ``resume_from`` and ``verify`` do."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _fault_util import build_checkpoints, memory_until, run_child
from ckptwriter import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFallbackWarning,
    CheckpointNotFoundError,
    UnsafePathError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)

EP3 = "ep_000003"
MEM3 = "memory_3.jsonl"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints ep 1..3 with latest -> ep_000003, written once per module."""
    root = tmp_path_factory.mktemp("pristine") / "checkpoints"
    build_checkpoints(root, 3)
    return root


@pytest.fixture
def ckpts(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine checkpoints to damage."""
    root = tmp_path / "checkpoints"
    shutil.copytree(pristine, root, symlinks=True)
    return root


# -- proof that a path is never read ---------------------------------------------------

_WATCHED: list[str] = []
_OPENED: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Every open() and os.open() raises the "open" audit event, before the file is opened.
    if event == "open" and _WATCHED and isinstance(args[0], (str, bytes, os.PathLike)):
        given = os.path.abspath(os.fsdecode(args[0]))
        flags = args[2] if isinstance(args[2], int) else 0
        # Where the open really lands: O_NOFOLLOW refuses a symlink as the last component.
        if flags & os.O_NOFOLLOW:
            path = os.path.join(os.path.realpath(os.path.dirname(given)), os.path.basename(given))
        else:
            path = os.path.realpath(given)
        if any(path.startswith(w) for w in _WATCHED):
            _OPENED.append(path)


sys.addaudithook(_audit)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory outside the checkpoints dir; once armed, opening anything in it fails."""
    d = tmp_path / "outside"
    d.mkdir()
    yield d
    _WATCHED.clear()
    opened = list(_OPENED)
    _OPENED.clear()
    assert opened == [], "a file outside the checkpoints directory was opened"


def _arm(d: Path) -> None:
    """From now on, record every open of a file under ``d`` (setup is done)."""
    _OPENED.clear()
    _WATCHED.append(str(d.resolve()))


def test_audit_hook_sees_opens(outside: Path) -> None:
    """The never-read proof works: opening a watched file is recorded."""
    (outside / "f").write_bytes(b"x")
    _arm(outside)
    (outside / "f").read_bytes()
    assert _OPENED == [str((outside / "f").resolve())]
    _OPENED.clear()


# -- damaged checkpoints ---------------------------------------------------------------


def _rewrite_runtime(ckpt: Path, **changes: Any) -> None:
    rt = json.loads((ckpt / "runtime.json").read_bytes())
    rt.update(changes)
    (ckpt / "runtime.json").write_text(json.dumps(rt))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


Damage = Callable[[Path], None]
DAMAGES: list[Any] = [
    pytest.param(lambda c: _truncate(c / MEM3), MEM3,
                 r"size \d+ bytes, expected \d+ \(truncated\?\)",
                 id="truncated-memory"),
    pytest.param(lambda c: _flip(c / MEM3, 40), MEM3, r"sha256 does not match runtime\.json",
                 id="flipped-byte-memory"),
    pytest.param(lambda c: _flip(c / "agent.json", 5), "agent.json",
                 r"sha256 does not match runtime\.json", id="flipped-byte-agent"),
    pytest.param(lambda c: (c / MEM3).unlink(), MEM3, r"missing", id="missing-memory"),
    pytest.param(lambda c: (c / "runtime.json").unlink(), "runtime.json", r"missing",
                 id="missing-runtime"),
    pytest.param(lambda c: (c / "runtime.json").write_bytes(b'{"episode_index": 3,'),
                 "runtime.json", r"invalid \(document: .*\)", id="invalid-runtime-json"),
    pytest.param(lambda c: (c / "runtime.json").write_bytes(b""), "runtime.json",
                 r"invalid \(document: .*\)", id="empty-runtime"),
    pytest.param(lambda c: _rewrite_runtime(c, format_version=99), "runtime.json",
                 r"invalid \(format_version: Value error, format_version 99 is not supported "
                 r"\(this ckptwriter reads 1\); upgrade ckptwriter or resume from a checkpoint "
                 r"written by this version\)", id="wrong-format-version"),
    pytest.param(lambda c: _rewrite_runtime(c, episode_index="three"), "runtime.json",
                 r"invalid \(episode_index: .*\)", id="wrong-type-runtime"),
    pytest.param(lambda c: _replace_with_dir(c / MEM3), MEM3, r"is not a regular file",
                 id="memory-is-a-directory"),
]


@pytest.mark.parametrize(("damage", "file", "problem"), DAMAGES)
def test_verify_names_broken_file(ckpts: Path, damage: Damage, file: str, problem: str) -> None:
    """verify_checkpoint raises CheckpointCorruptError naming the damaged file."""
    damage(ckpts / EP3)
    with pytest.raises(CheckpointCorruptError, match=rf"^Checkpoint {ckpts / EP3} is broken: "
                       rf"{file}: {problem}\. Resume from another checkpoint") as info:
        verify_checkpoint(ckpts / EP3)
    assert info.value.file == file


@pytest.mark.parametrize(("damage", "file", "problem"), DAMAGES)
def test_resume_from_broken_checkpoint_names_file(
    ckpts: Path, damage: Damage, file: str, problem: str
) -> None:
    """load_checkpoint of a named broken checkpoint is an error naming the file, no fallback."""
    damage(ckpts / EP3)
    with pytest.raises(CheckpointCorruptError, match=rf"^Checkpoint {ckpts / EP3} is broken: "
                       rf"{file}: {problem}\.") as info:
        load_checkpoint(ckpts / EP3)
    assert info.value.file == file


@pytest.mark.parametrize(("damage", "file", "problem"), DAMAGES)
@pytest.mark.parametrize("via", ["latest", "latest.json", "."])
def test_resume_from_latest_falls_back_with_warning(
    ckpts: Path, damage: Damage, file: str, problem: str, via: str
) -> None:
    """Resuming from latest when it is broken uses the newest valid checkpoint and warns."""
    damage(ckpts / EP3)
    with pytest.warns(CheckpointFallbackWarning, match=(
        rf"^latest points at {EP3}, which is broken \({file}: {problem}\); "
        rf"falling back to the newest valid checkpoint {ckpts}/ep_000002$"
    )):
        loaded = load_checkpoint(ckpts / via)
    assert loaded.runtime.episode_index == 2
    assert loaded.memory.to_jsonl() == memory_until(2).to_jsonl()


def test_memory_with_bad_line_but_matching_checksum_names_file(ckpts: Path) -> None:
    """A memory file whose checksum matches but whose content is not memory is named on load."""
    bad = b'{"type": "Observation", "content": 1}\n'
    (ckpts / EP3 / MEM3).write_bytes(bad)
    rt = json.loads((ckpts / EP3 / "runtime.json").read_bytes())
    rt["files"][MEM3] = {"bytes": len(bad), "sha256": hashlib.sha256(bad).hexdigest()}
    (ckpts / EP3 / "runtime.json").write_text(json.dumps(rt))
    with pytest.raises(CheckpointCorruptError, match=rf"^Checkpoint {ckpts / EP3} is broken: "
                       rf"{MEM3}: line 1 is not a valid memory entry"):
        load_checkpoint(ckpts / EP3)


def test_latest_missing_falls_back_with_warning(ckpts: Path) -> None:
    """With latest and latest.json both gone, the newest complete checkpoint is used, warned."""
    (ckpts / "latest").unlink()
    (ckpts / "latest.json").unlink()
    with pytest.warns(CheckpointFallbackWarning, match=(
        rf"^latest is missing; falling back to the newest valid checkpoint {ckpts}/{EP3}$"
    )):
        assert resolve_checkpoint(ckpts) == ckpts / EP3


def test_latest_dangling_falls_back_with_warning(ckpts: Path) -> None:
    """A latest symlink naming a checkpoint that does not exist falls back, with a warning."""
    shutil.rmtree(ckpts / EP3)
    with pytest.warns(CheckpointFallbackWarning, match=(
        rf"^latest points at {EP3}, which does not exist; falling back to the newest valid "
        rf"checkpoint {ckpts}/ep_000002$"
    )):
        assert resolve_checkpoint(ckpts / "latest") == ckpts / "ep_000002"


def test_everything_broken_is_not_found(ckpts: Path) -> None:
    """When no checkpoint is valid, resuming from latest is CheckpointNotFoundError, no guess."""
    for i in (1, 2, 3):
        _truncate(ckpts / f"ep_00000{i}" / f"memory_{i}.jsonl")
    with pytest.raises(CheckpointNotFoundError, match=(
        rf"^Checkpoint not found: {ckpts}/latest\nNo valid checkpoint in {ckpts} "
        rf"\(latest points at {EP3}, which is broken \({MEM3}: size"
    )):
        load_checkpoint(ckpts / "latest")


def test_listing_marks_damaged_checkpoint_incomplete(ckpts: Path) -> None:
    """list_checkpoints reports a truncated checkpoint as incomplete, naming the file."""
    _truncate(ckpts / EP3 / MEM3)
    info = {i.name: i for i in list_checkpoints(ckpts)}
    assert [info[n].complete for n in sorted(info)] == [True, True, False]
    assert info[EP3].problem is not None
    assert info[EP3].problem.startswith(f"{MEM3}: size")


# -- hostile manifests and pointers ----------------------------------------------------


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _plant_memory(outside: Path) -> Path:
    """A valid memory file outside: if a reader followed a path to it, loading would work."""
    target = outside / "memory.jsonl"
    target.write_bytes(memory_until(9).to_jsonl())
    return target


def _hostile_memory_path(ckpts: Path, outside: Path, kind: str) -> str:
    target = _plant_memory(outside)
    rel = os.path.relpath(target, ckpts / EP3)
    path = {"absolute": str(target), "dotdot": rel, "subdir": "sub/" + MEM3}[kind]
    files = json.loads((ckpts / EP3 / "runtime.json").read_bytes())["files"]
    files[path] = _digest(target.read_bytes())
    _rewrite_runtime(ckpts / EP3, memory_snapshot_path=path, files=files)
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "subdir"])
def test_memory_path_escaping_checkpoint_is_rejected(
    ckpts: Path, outside: Path, kind: str
) -> None:
    """memory_snapshot_path absolute, with .. or a subdirectory: UnsafePathError, never read."""
    path = _hostile_memory_path(ckpts, outside, kind)
    _arm(outside)
    with pytest.raises(UnsafePathError, match=(
        rf"^Checkpoint {ckpts / EP3} is broken: runtime\.json: invalid \(memory_snapshot_path: "
        rf"Value error, '{path}' is not a plain file name inside the checkpoint\)"
    )):
        load_checkpoint(ckpts / EP3)


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_memory_path_escaping_is_never_followed_from_latest(
    ckpts: Path, outside: Path, kind: str
) -> None:
    """Resuming from latest skips a hostile checkpoint (with a warning) and never opens outside."""
    _hostile_memory_path(ckpts, outside, kind)
    _arm(outside)
    with pytest.warns(CheckpointFallbackWarning,
                      match=r"^latest points at ep_000003, which is broken"):
        assert load_checkpoint(ckpts).runtime.episode_index == 2


def test_files_entry_escaping_checkpoint_is_rejected(ckpts: Path, outside: Path) -> None:
    """A files{} entry naming ../something: UnsafePathError, never read."""
    target = _plant_memory(outside)
    files = json.loads((ckpts / EP3 / "runtime.json").read_bytes())["files"]
    files[os.path.relpath(target, ckpts / EP3)] = _digest(target.read_bytes())
    _rewrite_runtime(ckpts / EP3, files=files)
    _arm(outside)
    with pytest.raises(UnsafePathError,
                       match=r"^Checkpoint .* is broken: runtime\.json: invalid \(files: "):
        verify_checkpoint(ckpts / EP3)


def _outside_checkpoint(outside: Path, pristine: Path) -> Path:
    """A valid checkpoint outside the checkpoints dir, as bait for a pointer."""
    bait = outside / "ep_000009"
    shutil.copytree(pristine / EP3, bait)
    return bait


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute", "relative"])
@pytest.mark.parametrize("via", ["latest", "."])
def test_latest_symlink_outside_is_rejected(
    ckpts: Path, outside: Path, pristine: Path, absolute: bool, via: str
) -> None:
    """A latest symlink pointing outside the checkpoints dir: UnsafePathError, never followed."""
    bait = _outside_checkpoint(outside, pristine)
    (ckpts / "latest").unlink()
    target = str(bait) if absolute else os.path.relpath(bait, ckpts)
    (ckpts / "latest").symlink_to(target)
    _arm(outside)
    with pytest.raises(UnsafePathError, match=(
        rf"^Checkpoint {ckpts} is broken: latest: points at '{target}', outside the "
        r"checkpoints directory; refusing to follow it\."
    )):
        load_checkpoint(ckpts / via)


def test_latest_json_outside_is_rejected(ckpts: Path, outside: Path, pristine: Path) -> None:
    """latest.json naming a checkpoint outside the checkpoints dir: UnsafePathError."""
    bait = _outside_checkpoint(outside, pristine)
    (ckpts / "latest").unlink()
    (ckpts / "latest.json").write_text(json.dumps(
        {"checkpoint": os.path.relpath(bait, ckpts), "episode_index": 9}))
    _arm(outside)
    with pytest.raises(UnsafePathError, match=(
        rf"^Checkpoint {ckpts} is broken: latest\.json: names a checkpoint outside the "
        r"checkpoints directory; refusing to follow it\."
    )):
        load_checkpoint(ckpts / "latest.json")


def test_latest_json_symlink_is_rejected(ckpts: Path, outside: Path) -> None:
    """latest.json that is itself a symlink to a file outside: UnsafePathError, never read."""
    (ckpts / "latest").unlink()
    (outside / "latest.json").write_text(json.dumps({"checkpoint": "ep_000001",
                                                     "episode_index": 1}))
    (ckpts / "latest.json").unlink()
    (ckpts / "latest.json").symlink_to(outside / "latest.json")
    _arm(outside)
    with pytest.raises(UnsafePathError,
                       match=r"^Checkpoint .* is broken: latest\.json: is a symlink"):
        resolve_checkpoint(ckpts)


def test_latest_to_symlinked_checkpoint_dir_is_rejected(
    ckpts: Path, outside: Path, pristine: Path
) -> None:
    """latest naming an ep_* entry that is a symlink to a directory outside: never followed."""
    bait = _outside_checkpoint(outside, pristine)
    (ckpts / "ep_000009").symlink_to(bait)
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to("ep_000009")
    _arm(outside)
    with pytest.raises(UnsafePathError, match=(
        rf"^Checkpoint {ckpts} is broken: ep_000009: is a symlink to {bait}; "
        r"refusing to follow it\."
    )):
        load_checkpoint(ckpts)


@pytest.mark.parametrize("name", [MEM3, "agent.json", "runtime.json"])
def test_symlinked_file_inside_checkpoint_is_rejected(
    ckpts: Path, outside: Path, name: str
) -> None:
    """A checkpoint file replaced by a symlink (to identical bytes outside): UnsafePathError."""
    copy = outside / name
    shutil.copyfile(ckpts / EP3 / name, copy)
    (ckpts / EP3 / name).unlink()
    (ckpts / EP3 / name).symlink_to(copy)
    _arm(outside)
    with pytest.raises(UnsafePathError, match=(
        rf"^Checkpoint {ckpts / EP3} is broken: {name}: is a symlink; refusing to follow it\."
    )):
        verify_checkpoint(ckpts / EP3)
    with pytest.raises(UnsafePathError):
        load_checkpoint(ckpts / EP3)


def test_files_entry_too_long_for_the_filesystem_is_corrupt(ckpts: Path) -> None:
    """A files{} name longer than NAME_MAX is a CheckpointCorruptError, not an OSError."""
    name = "a" * 300
    files = json.loads((ckpts / EP3 / "runtime.json").read_bytes())["files"]
    files[name] = {"bytes": 1, "sha256": "0" * 64}
    _rewrite_runtime(ckpts / EP3, files=files)
    with pytest.raises(CheckpointCorruptError, match=(
        rf"^Checkpoint {ckpts / EP3} is broken: {name}: unreadable \(File name too long\)\."
    )):
        verify_checkpoint(ckpts / EP3)


def test_latest_json_name_too_long_falls_back(ckpts: Path) -> None:
    """latest.json naming a checkpoint too long for the filesystem falls back, with a warning."""
    (ckpts / "latest").unlink()
    (ckpts / "latest.json").write_text(json.dumps({"checkpoint": "ep_" + "1" * 300,
                                                   "episode_index": 1}))
    with pytest.warns(CheckpointFallbackWarning,
                      match=r"^latest points at ep_1+, which does not exist"):
        assert resolve_checkpoint(ckpts) == ckpts / EP3


# -- fuzzing the manifest parser -------------------------------------------------------

_FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=12,
)
_NAMES = st.text(min_size=0, max_size=300) | st.sampled_from(
    [MEM3, "agent.json", "runtime.json", ".", "..", "/etc/passwd", "../x", "a" * 300, "\x00"])
_DIGESTS = st.fixed_dictionaries({
    "bytes": st.integers(min_value=-1, max_value=2**70) | _JSON,
    "sha256": st.sampled_from(["0" * 64, "g" * 64]) | _JSON,
})
_MANIFESTS = st.fixed_dictionaries(
    {},
    optional={
        "timestamp": _JSON, "episode_index": st.integers() | _JSON,
        "train_steps_total": st.integers() | _JSON, "agent_type": _JSON,
        "memory_snapshot_path": _NAMES | _JSON, "val_score": _JSON,
        "format_version": st.sampled_from([1, 0, 2]) | _JSON,
        "memory_entries": st.integers() | _JSON, "resumed_from": _JSON,
        "files": st.dictionaries(_NAMES, _DIGESTS, max_size=4) | _JSON,
    },
)


def _read_everything_as_resume_does(root: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointFallbackWarning)
        for call in (lambda: verify_checkpoint(root / EP3), lambda: load_checkpoint(root / EP3),
                     lambda: load_checkpoint(root), lambda: list_checkpoints(root)):
            try:
                call()
            except CheckpointError:
                pass


@pytest.fixture
def fuzz_root(ckpts: Path) -> Path:
    """A checkpoints copy whose ep_000003/runtime.json the fuzzer overwrites."""
    return ckpts


@_FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_runtime_json_random_bytes(fuzz_root: Path, data: bytes) -> None:
    """Random bytes as runtime.json: only CheckpointError subclasses escape the readers."""
    (fuzz_root / EP3 / "runtime.json").write_bytes(data)
    _read_everything_as_resume_does(fuzz_root)


@_FUZZ
@given(doc=_JSON)
def test_fuzz_runtime_json_random_json(fuzz_root: Path, doc: Any) -> None:
    """Random JSON documents as runtime.json: only CheckpointError subclasses escape."""
    (fuzz_root / EP3 / "runtime.json").write_text(json.dumps(doc))
    _read_everything_as_resume_does(fuzz_root)


@_FUZZ
@given(doc=_MANIFESTS)
def test_fuzz_runtime_json_manifest_shaped(fuzz_root: Path, doc: dict[str, Any]) -> None:
    """Manifest-shaped documents with hostile values: only CheckpointError subclasses escape."""
    (fuzz_root / EP3 / "runtime.json").write_text(json.dumps(doc))
    _read_everything_as_resume_does(fuzz_root)


_FIELDS = ["timestamp", "episode_index", "train_steps_total", "agent_type",
           "memory_snapshot_path", "val_score", "format_version", "memory_entries",
           "resumed_from", "files"]


@_FUZZ
@given(
    field=st.sampled_from(_FIELDS), value=_NAMES | _JSON,
    extra=st.none() | st.tuples(_NAMES, _DIGESTS),
)
def test_fuzz_runtime_json_one_field_of_a_real_manifest(
    fuzz_root: Path, pristine: Path, field: str, value: Any, extra: Any
) -> None:
    """A real runtime.json with one field (or one files{} entry) hostile: only CheckpointErrors."""
    doc = json.loads((pristine / EP3 / "runtime.json").read_bytes())
    doc[field] = value
    if extra is not None and isinstance(doc.get("files"), dict):
        doc["files"][extra[0]] = extra[1]
    (fuzz_root / EP3 / "runtime.json").write_text(json.dumps(doc))
    _read_everything_as_resume_does(fuzz_root)


@_FUZZ
@given(data=st.binary(max_size=300) | _JSON.map(lambda d: json.dumps(d).encode())
       | st.fixed_dictionaries({"checkpoint": _NAMES | _JSON, "episode_index": st.just(1)})
       .map(lambda d: json.dumps(d).encode()))
def test_fuzz_latest_json(fuzz_root: Path, data: bytes) -> None:
    """Random latest.json (no symlink): resolving latest raises only CheckpointError subclasses."""
    if (fuzz_root / "latest").is_symlink():
        (fuzz_root / "latest").unlink()
    (fuzz_root / "latest.json").write_bytes(data)
    _read_everything_as_resume_does(fuzz_root)


# -- file modes ------------------------------------------------------------------------


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():  # a symlink's own mode is always 0777 on Linux
                out[str(p.relative_to(root.parent))] = stat.S_IMODE(p.lstat().st_mode)
    return out


@pytest.mark.parametrize(("umask", "forbidden", "executor"), [
    pytest.param("000", stat.S_IWOTH, "process", id="umask-000-nothing-world-writable"),
    pytest.param("022", stat.S_IWOTH | stat.S_IWGRP, "thread", id="umask-022"),
    pytest.param("077", 0o077, "thread", id="umask-077-private"),
])
def test_created_files_respect_umask(
    tmp_path: Path, umask: str, forbidden: int, executor: str
) -> None:
    """Everything the writer creates (parents too) obeys the umask and is never world-writable."""
    base = tmp_path / "base"
    base.mkdir()
    res = run_child("umask", str(base / "deep" / "er" / "checkpoints"), umask, executor)
    assert res.returncode == 0, res.stderr
    modes = _modes(base)
    assert len(modes) >= 10
    bad = {p: oct(m) for p, m in modes.items() if m & forbidden}
    assert bad == {}


_TRAIN_UNDER_UMASK = """
import os, sys
os.umask(int(sys.argv[1], 8))
from ckptwriter.cli import main
raise SystemExit(main(["train", "--config", sys.argv[2], "-q"]))
"""


@pytest.mark.parametrize(("umask", "forbidden"), [
    pytest.param("000", stat.S_IWOTH, id="umask-000-nothing-world-writable"),
    pytest.param("077", 0o077, id="umask-077-private"),
])
def test_cli_run_tree_respects_umask(tmp_path: Path, umask: str, forbidden: int) -> None:
    """`ckptwriter train` creates outputs/, the run dir, config.yaml and checkpoints safely."""
    import subprocess

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'base' / 'outputs'}\nruntime:\n"
                   "  max_envs_to_visit: 3\n  checkpoint_dir: checkpoints\n"
                   "  checkpoint_every_episodes: 1\n")
    res = subprocess.run([sys.executable, "-c", _TRAIN_UNDER_UMASK, umask, str(cfg)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    modes = _modes(tmp_path / "base")
    assert any(p.endswith("config.yaml") for p in modes)
    assert {p: oct(m) for p, m in modes.items() if m & forbidden} == {}


# -- what the command line says about a broken checkpoint ------------------------------


@pytest.mark.parametrize(("damage", "file", "problem"), DAMAGES[:4])
def test_cli_verify_names_broken_file(
    ckpts: Path, capsys: pytest.CaptureFixture[str], damage: Damage, file: str, problem: str
) -> None:
    """`ckptwriter verify` exits 1 and prints BROKEN with the file and problem."""
    from ckptwriter.cli import main as cli_main

    damage(ckpts / EP3)
    assert cli_main(["verify", str(ckpts)]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^BROKEN  {ckpts / EP3}: {file}: {problem}$", out, re.M), out
    assert re.search(rf"^OK      {ckpts / 'ep_000002'} ", out, re.M), out
    assert out.rstrip().endswith("2/3 checkpoints OK, 1 problem(s)")


def _train_resuming(tmp_path: Path, resume_from: Path) -> int:
    cfg = tmp_path / "resume.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'outputs'}\nruntime:\n  max_envs_to_visit: 6\n"
                   f"  checkpoint_dir: checkpoints\n  resume_from: {resume_from}\n"
                   "  executor: thread\n")
    from ckptwriter.cli import main as cli_main

    return cli_main(["train", "--config", str(cfg), "-q"])


def test_cli_resume_from_broken_checkpoint_names_file(
    ckpts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resume_from` naming a broken checkpoint: exit 1 and an error naming the file."""
    _truncate(ckpts / EP3 / MEM3)
    assert _train_resuming(tmp_path, ckpts / EP3) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: Checkpoint {ckpts / EP3} is broken: {MEM3}: size ")
    assert "Traceback" not in err


def test_cli_resume_from_broken_latest_falls_back(
    ckpts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resume_from: .../latest` when latest is broken resumes from ep 2 with a warning."""
    _truncate(ckpts / EP3 / MEM3)
    assert _train_resuming(tmp_path, ckpts / "latest") == 0
    err = capsys.readouterr().err
    assert re.search(rf"^warning: latest points at {EP3}, which is broken \({MEM3}: size .*; "
                     rf"falling back to the newest valid checkpoint {ckpts}/ep_000002$", err, re.M)
    run = next((tmp_path / "outputs").glob("*/*/checkpoints"))
    assert load_checkpoint(run).runtime.resumed_from == str((ckpts / "ep_000002").resolve())
