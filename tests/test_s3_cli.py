"""The command line on S3: train into a bucket, resume from it elsewhere, ls/show/verify/du.

Runs ``ckptwriter.cli.main`` in process against moto's server on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _s3_util import Backend, make_backend, s3_endpoint  # noqa: F401 -- fixture
from ckptwriter.cli import main

pytestmark = pytest.mark.s3


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh checkpoints prefix on S3."""
    return make_backend("s3", tmp_path, request)


def write_config(path: Path, output_dir: Path, checkpoint_dir: str, episodes: int,
                 resume_from: str | None = None) -> str:
    """A training config checkpointing every 5 episodes into ``checkpoint_dir``."""
    lines = [
        "run_name: fleet",
        f"output_dir: {output_dir}",
        "runtime:",
        f"  max_envs_to_visit: {episodes}",
        f"  checkpoint_dir: {checkpoint_dir}",
        "  checkpoint_every_episodes: 5",
        "  checkpoint_keep_last: 2",
    ]
    if resume_from:
        lines.append(f"  resume_from: {resume_from}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def trained(s3: Backend, tmp_path: Path) -> Backend:
    """A bucket prefix after a 10-episode run on 'machine A' (its own output_dir)."""
    cfg = write_config(tmp_path / "a.yaml", tmp_path / "machine_a", s3.url, 10)
    assert main(["train", "--config", cfg, "--quiet"]) == 0
    return s3


def test_train_resumes_on_another_machine_from_the_bucket(
    trained: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run with its own output_dir resumes from s3://.../latest and continues."""
    cfg = write_config(tmp_path / "b.yaml", tmp_path / "machine_b", trained.url, 20,
                       resume_from=f"{trained.url}/latest")
    capsys.readouterr()
    assert main(["train", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert f"Checkpoints are in {trained.url} (latest -> ep_000020)" in out
    assert main(["show", f"{trained.url}/latest"]) == 0
    shown = capsys.readouterr().out
    assert f'"resumed_from": "{trained.url}/ep_000010"' in shown


def test_ls_lists_the_bucket_checkpoints(
    trained: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    """ls on a bucket prefix shows each committed checkpoint and which is latest."""
    capsys.readouterr()
    assert main(["ls", trained.url]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if "ep_0000" in r]
    assert [r.split()[1] for r in rows] == ["ep_000005", "ep_000010"]
    assert "<- latest" in rows[-1]


def test_verify_reports_a_damaged_object(
    trained: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify exits non-zero and names the object whose checksum no longer matches."""
    data = trained.read_raw("ep_000005/memory_5.jsonl")
    trained.write_raw("ep_000005/memory_5.jsonl", data.replace(b"Solve", b"Salve", 1))
    capsys.readouterr()
    assert main(["verify", trained.url]) == 1
    out = capsys.readouterr().out
    assert f"BROKEN  {trained.url}/ep_000005: memory_5.jsonl: sha256 does not match" in out
    assert f"OK      {trained.url}/ep_000010" in out


def test_verify_one_checkpoint_by_its_url(
    trained: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify on one checkpoint's URL checks that checkpoint only."""
    capsys.readouterr()
    assert main(["verify", f"{trained.url}/ep_000010"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"OK      {trained.url}/ep_000010 (2 files, episode 10)", "1/1 checkpoints OK"]


def test_du_sums_the_objects_of_each_checkpoint(
    trained: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    """du prints one line per checkpoint and the prefix total, from the bucket listing."""
    capsys.readouterr()
    assert main(["du", trained.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[-1] for ln in lines[:2]] == [
        f"{trained.url}/ep_000005", f"{trained.url}/ep_000010"]
    assert lines[2].endswith(f"{trained.url}  (run total)")


@pytest.mark.usefixtures("s3_endpoint")
def test_missing_bucket_exits_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    """ls on a bucket that does not exist exits 1 and says to create it."""
    assert main(["ls", "s3://no-such-bucket-cli/x"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "bucket 'no-such-bucket-cli' does not exist" in err
    assert "aws s3 mb s3://no-such-bucket-cli" in err
