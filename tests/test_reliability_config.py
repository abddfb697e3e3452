"""Hostile and broken configuration files: always a ConfigError, never a traceback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptwriter import CheckpointError, ConfigError
from ckptwriter.cli import main as cli_main
from ckptwriter.config import load_config

_FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(tmp_path: Path, data: bytes | str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


# -- safe loading ----------------------------------------------------------------------


@pytest.mark.parametrize("tag", [
    pytest.param("!!python/object/apply:os.system [\"touch {sentinel}\"]", id="apply"),
    pytest.param("!!python/object/new:os.system [\"touch {sentinel}\"]", id="new"),
    pytest.param("!!python/name:os.system", id="name"),
    pytest.param("!!python/module:os", id="module"),
])
def test_python_tags_are_refused_never_run(tmp_path: Path, tag: str) -> None:
    """YAML python tags: ConfigError naming them, and the payload never runs."""
    sentinel = tmp_path / "pwned"
    cfg = _write(tmp_path, "runtime:\n  checkpoint_dir: " + tag.format(sentinel=sentinel) + "\n")
    with pytest.raises(ConfigError, match=(
        rf"^{cfg} line \d+, column \d+: Python tags \(!!python/\.\.\.\) are not allowed; "
        r"a config file holds plain YAML data only$"
    )):
        load_config(cfg)
    assert not sentinel.exists()


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """A billion-laughs alias bomb is refused in well under a second, without expanding."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    cfg = _write(tmp_path, "\n".join(lines) + "\nruntime: *a9\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^.*the document is too large \(more than \d+ values"):
        load_config(cfg)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("doc", [
    pytest.param("runtime: " + "[" * 50_000 + "]" * 50_000, id="flow-nesting"),
    pytest.param("".join(f"{'  ' * i}k{i}:\n" for i in range(500)), id="block-nesting"),
])
def test_deep_nesting_is_refused(tmp_path: Path, doc: str) -> None:
    """Deeply nested documents are a ConfigError, not a RecursionError."""
    with pytest.raises(ConfigError, match=r"nested too deeply|invalid YAML"):
        load_config(_write(tmp_path, doc))


def test_huge_file_is_refused(tmp_path: Path) -> None:
    """A config file over the size limit is refused before it is parsed."""
    cfg = _write(tmp_path, b"# " + b"x" * (2 * 1024 * 1024) + b"\n")
    with pytest.raises(ConfigError, match=r"is too large for a config file"):
        load_config(cfg)


def test_endless_device_is_refused(tmp_path: Path) -> None:
    """/dev/zero as the config (stat says 0 bytes) is refused after the limit, not read forever."""
    with pytest.raises(ConfigError, match=r"^/dev/zero: more than \d+ bytes is too large"):
        load_config("/dev/zero")


@pytest.mark.parametrize("data", [
    pytest.param(b"runtime:\n  checkpoint_dir: \xff\xfe\n", id="invalid-utf8"),
    pytest.param("runtime: {}\n".encode("utf-16"), id="utf-16"),
    pytest.param(b"\x00\x01\x02", id="binary"),
])
def test_non_utf8_is_refused(tmp_path: Path, data: bytes) -> None:
    """Bytes that are not UTF-8 text: ConfigError saying so."""
    with pytest.raises(ConfigError, match=r"not UTF-8 text|invalid YAML|unsupported YAML"):
        load_config(_write(tmp_path, data))


@pytest.mark.parametrize(("doc", "problem"), [
    pytest.param("runtime: [1, 2]\n", r"runtime", id="section-is-list"),
    pytest.param("runtime:\n  max_envs_to_visit: lots\n", r"max_envs_to_visit", id="str-for-int"),
    pytest.param("runtime:\n  max_envs_to_visit: -5\n", r"max_envs_to_visit", id="negative"),
    pytest.param("runtime:\n  fsync: maybe\n", r"fsync", id="str-for-bool"),
    pytest.param("runtime:\n  checkpoint_dir: [a, b]\n", r"checkpoint_dir", id="list-for-str"),
    pytest.param("- a\n- b\n", r"top level must be a mapping", id="top-level-list"),
    pytest.param("runtime:\n  {1: 2}: x\n", r"not a string|invalid YAML|unsupported",
                 id="mapping-key"),
])
def test_wrong_types_name_the_key(tmp_path: Path, doc: str, problem: str) -> None:
    """Values of the wrong type: a ConfigError that names the key."""
    with pytest.raises(ConfigError, match=problem):
        load_config(_write(tmp_path, doc))


# -- fuzzing ---------------------------------------------------------------------------

_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
            | st.binary(max_size=8))
_VALUES = st.recursive(
    _SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.text(max_size=10) | st.integers(), kids, max_size=4),
    max_leaves=15,
)
_KEYS = st.sampled_from([
    "max_envs_to_visit", "checkpoint_dir", "checkpoint_every_episodes", "checkpoint_keep_last",
    "checkpoint_strategy", "checkpoint_on_start", "resume_from", "validation_freq",
    "run_validation_at_start", "max_pending", "on_backlog", "on_error", "fsync", "executor",
    "checkpoint_keeplast",
])
_CONFIGS = st.fixed_dictionaries({}, optional={
    "runtime": st.dictionaries(_KEYS, _VALUES, max_size=5) | _VALUES,
    "agent": st.dictionaries(st.sampled_from(["type", "memory_type", "config"]), _VALUES)
    | _VALUES,
    "environment": st.dictionaries(
        st.sampled_from(["type", "seed", "num_tasks", "max_operand", "max_attempts"]), _VALUES)
    | _VALUES,
    "validation": _VALUES, "run_name": _VALUES, "output_dir": _VALUES,
})


def _load_only_config_errors(path: Path, overrides: tuple[str, ...] = ()) -> None:
    try:
        load_config(path, overrides)
    except ConfigError:
        pass


@_FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_config_random_bytes(tmp_path: Path, data: bytes) -> None:
    """Random bytes as a config file: load_config returns or raises ConfigError, nothing else."""
    _load_only_config_errors(_write(tmp_path, data))


@_FUZZ
@given(text=st.text(max_size=300))
def test_fuzz_config_random_text(tmp_path: Path, text: str) -> None:
    """Random text as a config file: only ConfigError escapes."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")
    _load_only_config_errors(_write(tmp_path, data))


@settings(_FUZZ, max_examples=80)
@given(doc=_CONFIGS)
def test_fuzz_config_shaped_documents(tmp_path: Path, doc: dict[str, Any]) -> None:
    """Config-shaped YAML with values of every type in every key: only ConfigError escapes."""
    _load_only_config_errors(_write(tmp_path, yaml.dump(doc)))


@_FUZZ
@given(overrides=st.lists(st.text(max_size=40) | st.builds(
    lambda k, v: f"runtime.{k}={v}", _KEYS, st.text(max_size=20)), max_size=3))
def test_fuzz_config_overrides(tmp_path: Path, overrides: list[str]) -> None:
    """Random --set overrides on a valid file: only ConfigError escapes."""
    cfg = tmp_path / "ok.yaml"
    if not cfg.exists():
        cfg.write_text("runtime:\n  max_envs_to_visit: 10\n")
    _load_only_config_errors(cfg, tuple(overrides))


# -- what the user sees ----------------------------------------------------------------


@pytest.mark.parametrize("doc", [
    pytest.param(b"runtime: !!python/object/apply:os.system [ls]\n", id="python-tag"),
    pytest.param(b"\xff\xfe\xfa", id="non-utf8"),
    pytest.param(b"runtime:\n  max_envs_to_visit: lots\n", id="wrong-type"),
])
def test_cli_reports_config_error_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: bytes
) -> None:
    """`ckptwriter train` with a bad config: exit 2, one `error:` message, no traceback."""
    cfg = _write(tmp_path, doc)
    assert cli_main(["train", "--config", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}")
    assert "Traceback" not in err


def test_config_error_is_a_checkpoint_error() -> None:
    """ConfigError is caught by `except CheckpointError` like every other library error."""
    assert issubclass(ConfigError, CheckpointError)
