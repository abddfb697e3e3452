"""Finding, verifying and loading checkpoints: every form of path resume_from accepts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio
import pytest

from ckptwriter import (
    CheckpointCorruptError,
    CheckpointFallbackWarning,
    CheckpointNotFoundError,
    CheckpointWriter,
    MemoryLog,
    MemoryTypeMismatchError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from conftest import add_episode, snapshot


def _write(root: Path, episodes: list[int], keep_last: int | None = None) -> MemoryLog:
    mem = MemoryLog()

    async def go() -> None:
        async with CheckpointWriter(root, keep_last=keep_last, fsync=False) as w:
            for ep in episodes:
                add_episode(mem, ep)
                await w.submit(snapshot(mem, ep, val_score=ep / 1000))

    anyio.run(go)
    return mem


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """outputs/my_run/20240115_103045 with checkpoints 100, 200, 300."""
    run = tmp_path / "outputs" / "my_run" / "20240115_103045"
    _write(run / "checkpoints", [100, 200, 300])
    return run


@pytest.mark.parametrize(
    "rel",
    [
        pytest.param("checkpoints/latest", id="latest-symlink"),
        pytest.param("checkpoints/latest.json", id="latest-json"),
        pytest.param("checkpoints", id="checkpoints-dir"),
        pytest.param(".", id="run-dir"),
        pytest.param("..", id="run-name-dir"),
    ],
)
def test_latest_forms_resolve_to_newest(run_dir: Path, rel: str) -> None:
    """latest, latest.json, checkpoints/, the run dir and outputs/<run_name> all mean latest."""
    assert resolve_checkpoint(run_dir / rel).name == "ep_000300"


def test_specific_checkpoint_resolves_to_itself(run_dir: Path) -> None:
    """A checkpoint directory resolves to itself."""
    assert resolve_checkpoint(run_dir / "checkpoints" / "ep_000200").name == "ep_000200"


def test_round_trip_restores_memory_byte_identically(tmp_path: Path) -> None:
    """load_checkpoint returns the manifests and the memory exactly as written."""
    mem = _write(tmp_path, [1, 2, 3])
    loaded = load_checkpoint(tmp_path / "latest")
    assert loaded.memory.to_jsonl() == mem.to_jsonl()
    assert loaded.runtime.episode_index == 3
    assert loaded.agent.agent_type == "HistoryAgent"
    assert loaded.agent.memory_type == "history"


def test_missing_path_lists_nearby_checkpoints(run_dir: Path) -> None:
    """The guide's "Checkpoint not found" names the path and what exists nearby."""
    wrong = run_dir / "checkpoints" / "ep_000500"
    with pytest.raises(CheckpointNotFoundError, match=r"^Checkpoint not found: .*ep_000500\n") as e:
        resolve_checkpoint(wrong)
    assert any(p.endswith("ep_000300") for p in e.value.nearby)
    assert "ep_000100" in str(e.value)


def test_broken_named_checkpoint_names_the_file(run_dir: Path) -> None:
    """resume_from at a damaged checkpoint says which file is broken."""
    ck = run_dir / "checkpoints" / "ep_000200"
    data = bytearray((ck / "memory_200.jsonl").read_bytes())
    data[5] ^= 0x01
    (ck / "memory_200.jsonl").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"memory_200\.jsonl: sha256 does not match"):
        load_checkpoint(ck)


def test_broken_latest_falls_back_with_warning(run_dir: Path) -> None:
    """When latest names a broken checkpoint, the newest valid one is used, with a warning."""
    (run_dir / "checkpoints" / "ep_000300" / "memory_300.jsonl").write_bytes(b"")
    with pytest.warns(CheckpointFallbackWarning, match=r"ep_000300, which is broken"):
        assert resolve_checkpoint(run_dir / "checkpoints" / "latest").name == "ep_000200"


def test_missing_latest_falls_back_with_warning(run_dir: Path) -> None:
    """With latest and latest.json gone, the newest complete checkpoint is used."""
    os.unlink(run_dir / "checkpoints" / "latest")
    os.unlink(run_dir / "checkpoints" / "latest.json")
    with pytest.warns(CheckpointFallbackWarning, match=r"^latest is missing"):
        assert resolve_checkpoint(run_dir / "checkpoints").name == "ep_000300"


def test_memory_type_mismatch_names_both(run_dir: Path) -> None:
    """Resuming with another memory type is refused, naming both types."""
    with pytest.raises(MemoryTypeMismatchError, match=r"holds memory_type 'history' but the agent "
                                                      r"uses memory_type 'vector'"):
        load_checkpoint(run_dir / "checkpoints" / "latest", expected_memory_type="vector")


def test_missing_memory_file_says_memory_not_restored(run_dir: Path) -> None:
    """A missing memory snapshot is named."""
    os.unlink(run_dir / "checkpoints" / "ep_000100" / "memory_100.jsonl")
    with pytest.raises(CheckpointCorruptError, match=r"memory_100\.jsonl: missing"):
        verify_checkpoint(run_dir / "checkpoints" / "ep_000100")


def test_list_checkpoints_marks_incomplete(run_dir: Path) -> None:
    """list_checkpoints reports complete and incomplete directories, oldest first."""
    shutil.copytree(run_dir / "checkpoints" / "ep_000300", run_dir / "checkpoints" / "ep_000400")
    os.unlink(run_dir / "checkpoints" / "ep_000400" / "runtime.json")
    infos = list_checkpoints(run_dir / "checkpoints")
    assert [(i.name, i.complete) for i in infos] == [
        ("ep_000100", True), ("ep_000200", True), ("ep_000300", True), ("ep_000400", False)]
    assert infos[3].problem == "runtime.json: missing"
    assert infos[0].runtime is not None
    assert infos[0].runtime.val_score == 0.1


def test_episode_index_must_match_the_directory(run_dir: Path) -> None:
    """An edited episode_index cannot silently restart training from the wrong episode."""
    rt = run_dir / "checkpoints" / "ep_000200" / "runtime.json"
    rt.write_text(rt.read_text().replace('"episode_index": 200', '"episode_index": 0'))
    with pytest.raises(CheckpointCorruptError,
                       match=r"runtime\.json: episode_index is 0 but the directory is ep_000200"):
        verify_checkpoint(rt.parent)


def test_file_inside_a_checkpoint_names_its_directory(run_dir: Path) -> None:
    """resume_from pointing at a file of a checkpoint says to pass the directory."""
    f = run_dir / "checkpoints" / "ep_000200" / "runtime.json"
    with pytest.raises(CheckpointNotFoundError,
                       match=r"file inside checkpoint ep_000200: pass the checkpoint directory"):
        resolve_checkpoint(f)


def test_nearby_looks_beside_an_empty_run(run_dir: Path) -> None:
    """A run directory without checkpoints points at its siblings' checkpoints."""
    empty = run_dir.parent / "20240116_000000"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError) as e:
        resolve_checkpoint(empty)
    assert any(p.endswith("ep_000300") for p in e.value.nearby)
