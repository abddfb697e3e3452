"""Names and paths (ckptwriter.layout): the one run ordering, what names a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptwriter import (
    MemoryLog,
    Observation,
    Snapshot,
    SyncCheckpointWriter,
    layout,
    list_checkpoints,
    load_checkpoint,
)


@pytest.mark.parametrize("names", [
    pytest.param(["20240101_000000", "20240101_000000_1", "20240101_000000_2",
                  "20240101_000000_10"], id="same-second"),
    pytest.param(["20231231_235959_10", "20240101_000000"], id="next-second"),
    pytest.param(["run_2", "run_10", "run_10a"], id="run-names"),
])
def test_run_sort_key_is_natural_order(names: list[str]) -> None:
    """Runs sort by their numbers, not as strings: _2 before _10."""
    assert sorted(reversed(names), key=layout.run_sort_key) == names


@pytest.mark.parametrize("name", [
    pytest.param("ep_" + "1" * 5000, id="5000-digits"),
    pytest.param("ep_" + "1" * 19, id="19-digits"),
    pytest.param("ep_\u0660\u0660\u0660\u0660\u0661\u0660", id="arabic-indic-digits"),
    pytest.param("ep_000010\n", id="trailing-newline"),
    pytest.param("ep_00001", id="5-digits"),
])
def test_names_that_are_not_checkpoints(name: str) -> None:
    """Only ep_ and 6 to 18 ASCII digits name a checkpoint: never int() of a planted name."""
    assert layout.parse_checkpoint_name(name) is None


def test_run_order_takes_a_name_of_any_length() -> None:
    """A digit run of thousands of digits sorts (as the number it is) without int()."""
    huge = "20240101_000000_1" + "0" * 5000
    names = ["20240101_000000", "20240101_000000_9", "20240101_000000_10", huge]
    assert sorted(reversed(names), key=layout.run_sort_key) == names


def test_stream_names_refuse_a_trailing_newline() -> None:
    """$ matches before a final newline; names use \\Z."""
    assert layout.STREAM_NAME_RE.match("notes\n") is None
    assert layout.RUN_DIR_RE.match("20240101_000000\n") is None


def test_planted_names_are_ignored_by_readers_and_the_writer(tmp_path: Path) -> None:
    """Directories named like checkpoints but not one (200 digits, other scripts' digits)
    are neither listed nor in the way of the writer."""
    root = tmp_path / "checkpoints"
    for name in ("ep_" + "7" * 200, "ep_\u0660\u0660\u0660\u0660\u0661\u0660"):
        (root / name).mkdir(parents=True)
    memory = MemoryLog([Observation(content="hello")])
    with SyncCheckpointWriter(root) as writer:
        writer.submit(Snapshot(1, 1, "A", memory)).wait()
    assert [i.name for i in list_checkpoints(root)] == ["ep_000001"]
    assert load_checkpoint(root).runtime.episode_index == 1
