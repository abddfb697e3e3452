"""Configuration loading: models, did-you-mean errors, hostile files, the guide's rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from ckptwriter import ConfigError
from ckptwriter.config import (
    DEFAULT_MAX_ENVS_TO_VISIT,
    DEFAULT_TOP_K,
    Config,
    dump_config,
    load_config,
    parse_overrides,
)


def _write(tmp_path: Path, text: str | bytes, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _load(tmp_path: Path, text: str, *overrides: str) -> Config:
    return load_config(_write(tmp_path, text), list(overrides))


def test_guide_quick_start_loads_with_defaults(tmp_path: Path) -> None:
    """A runtime-only snippet gets every other section's defaults."""
    cfg = _load(tmp_path, "runtime:\n  checkpoint_dir: checkpoints\n"
                "  checkpoint_every_episodes: 50\n  checkpoint_keep_last: 5\n")
    assert (cfg.runtime.checkpoint_every_episodes, cfg.runtime.checkpoint_keep_last) == (50, 5)
    assert (cfg.agent.type, cfg.agent.memory_type) == ("HistoryAgent", "history")
    assert cfg.validation.validation_dataset == "built-in"
    assert (cfg.run_name, cfg.output_dir) == ("cfg", "outputs")


def test_max_envs_to_visit_defaults_to_100_fresh_and_100_more_on_resume(tmp_path: Path) -> None:
    """Without max_envs_to_visit a run trains 100 episodes (100 more when resumed)."""
    rt = _load(tmp_path, "runtime: {}\n").runtime
    assert rt.episodes_for(0) == DEFAULT_MAX_ENVS_TO_VISIT == 100
    assert rt.episodes_for(500) == 600


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    """An empty file is a valid configuration."""
    assert _load(tmp_path, "").runtime.checkpoint_dir == "checkpoints"


def test_run_name_defaults_to_file_stem(tmp_path: Path) -> None:
    """run_name is the config file's stem unless set."""
    path = _write(tmp_path, "runtime: {}\n", "stage1.yaml")
    assert load_config(path).run_name == "stage1"
    assert load_config(_write(tmp_path, "run_name: x\n", "b.yaml")).run_name == "x"


def test_unknown_key_names_key_file_and_closest(tmp_path: Path) -> None:
    """A typo names the key, the file and the closest valid key."""
    path = _write(tmp_path, "runtime:\n  checkpoint_keep_lst: 5\n")
    with pytest.raises(ConfigError, match=(
        rf"^Unknown key 'runtime.checkpoint_keep_lst' in {path}; "
        r"did you mean checkpoint_keep_last\?$")):
        load_config(path)


def test_unknown_section_suggests_closest(tmp_path: Path) -> None:
    """A misspelled section gets a suggestion too."""
    with pytest.raises(ConfigError, match=r"^Unknown key 'runtme' in .*did you mean runtime\?$"):
        _load(tmp_path, "runtme:\n  checkpoint_dir: x\n")


def test_runtime_key_at_top_level_points_under_runtime(tmp_path: Path) -> None:
    """A runtime key written at the top level is pointed under `runtime:`."""
    with pytest.raises(ConfigError, match=r"did you mean runtime\.checkpoint_every_episodes\?"):
        _load(tmp_path, "checkpoint_every_episodes: 50\n")


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    """With nothing close, the valid keys of that section are listed."""
    with pytest.raises(ConfigError, match=r"valid keys here: type, memory_type, config$"):
        _load(tmp_path, "agent:\n  zzzzzz: 1\n")


@pytest.mark.parametrize(("text", "needle"), [
    pytest.param("runtime:\n  checkpoint_every_episodes: fifty\n",
                 r"runtime\.checkpoint_every_episodes: Input should be a valid integer "
                 r"\(got 'fifty'\)", id="str-for-int"),
    pytest.param("runtime:\n  checkpoint_on_start: 'yes'\n",
                 r"runtime\.checkpoint_on_start: Input should be a valid boolean", id="str-bool"),
    pytest.param("runtime:\n  checkpoint_strategy: best\n",
                 r"runtime\.checkpoint_strategy: Input should be 'all', 'last_n' or 'top_k_val'",
                 id="bad-strategy"),
    pytest.param("runtime:\n  validation_freq: 0\n",
                 r"runtime\.validation_freq: Input should be greater than 0", id="zero-freq"),
    pytest.param("runtime: [1, 2]\n", r"runtime: expected a mapping of settings",
                 id="list-section"),
])
def test_wrong_type_is_named(tmp_path: Path, text: str, needle: str) -> None:
    """A wrong type names the key, what was expected and what was found."""
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'cfg.yaml'}: {needle}"):
        _load(tmp_path, text)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    """A YAML list at the top level is refused clearly."""
    with pytest.raises(ConfigError, match=r"the top level must be a mapping .*found a list$"):
        _load(tmp_path, "- runtime\n")


def test_non_utf8_file(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 give a clear error, not a decode traceback."""
    path = _write(tmp_path, b"runtime:\n  checkpoint_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 27\); save the file as UTF-8$"):
        load_config(path)


def test_python_tag_refused(tmp_path: Path) -> None:
    """safe_load only: a !!python tag is refused with a message saying so."""
    with pytest.raises(ConfigError, match=r"Python tags \(!!python/\.\.\.\) are not allowed"):
        _load(tmp_path, "runtime: !!python/object/apply:os.system ['echo hi']\n")


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    """A syntax error names the line."""
    with pytest.raises(ConfigError, match=(
            r"cfg\.yaml line 2, column 7: invalid YAML: mapping values are not allowed here$")):
        _load(tmp_path, "runtime:\n  a: b: c\n")


def test_alias_bomb_refused(tmp_path: Path) -> None:
    """Exponential aliases hit the size limit instead of expanding."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match=r"the document is too large"):
        _load(tmp_path, "agent:\n  config:\n" + "".join(f"    {ln}\n" for ln in lines))


def test_deep_nesting_refused(tmp_path: Path) -> None:
    """Deep nesting is a ConfigError, not a RecursionError traceback."""
    with pytest.raises(ConfigError, match=r"nested too deeply"):
        _load(tmp_path, "agent:\n  config: " + "[" * 5000 + "]" * 5000 + "\n")


def test_deep_block_nesting_refused(tmp_path: Path) -> None:
    """Deep indentation nesting is refused too."""
    text = "".join(" " * i + f"k{i}:\n" for i in range(40)) + " " * 40 + "v: 1\n"
    with pytest.raises(ConfigError, match=r"nested too deeply \(limit 32\)$"):
        _load(tmp_path, text)


def test_moderate_nesting_beyond_limit_refused(tmp_path: Path) -> None:
    """Nesting past the depth limit is refused even when the parser copes."""
    with pytest.raises(ConfigError, match=r"nested too deeply \(limit 32 levels\)$"):
        _load(tmp_path, "agent:\n  config: " + "[" * 40 + "]" * 40 + "\n")


def test_huge_file_refused(tmp_path: Path) -> None:
    """A file over 1 MiB is refused before parsing."""
    path = _write(tmp_path, "# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(ConfigError, match=r"too large for a config file"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    """A missing config file is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=rf"^Config file not found: {tmp_path / 'nope.yaml'}$"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_yaml_values(tmp_path: Path) -> None:
    """--set values are typed YAML: ints, bools, null."""
    cfg = _load(tmp_path, "runtime:\n  checkpoint_keep_last: 5\n",
                "runtime.max_envs_to_visit=300", "runtime.fsync=false",
                "runtime.checkpoint_keep_last=null", "agent.config.learn=false")
    assert cfg.runtime.max_envs_to_visit == 300
    assert cfg.runtime.fsync is False
    assert cfg.runtime.checkpoint_keep_last is None
    assert cfg.agent.config == {"learn": False}


def test_override_without_equals(tmp_path: Path) -> None:
    """An override that is not KEY=VALUE says how to write one."""
    with pytest.raises(ConfigError, match=r"^--set 'runtime\.fsync': expected KEY=VALUE"):
        parse_overrides(["runtime.fsync"])


def test_override_that_is_not_utf8_names_it_and_the_fix() -> None:
    """A --set value holding a non-UTF-8 file name (the shell passes bytes) is refused clearly."""
    value = os.fsdecode(b"runtime.checkpoint_dir=/data/caf\xe9")
    with pytest.raises(ConfigError, match=(
        r"^--set runtime\.checkpoint_dir=/data/caf\\xe9: the value is not valid UTF-8 text "
        r"\(a file name in another encoding\?\), which a config cannot hold; rename it, or "
        r"name it through a symlink whose name is UTF-8 \(ln -s <it> <name>\)$")):
        parse_overrides([value])


def test_override_unknown_key_names_the_override(tmp_path: Path) -> None:
    """An unknown key from --set is reported as coming from --set."""
    with pytest.raises(ConfigError, match=(
        r"^Unknown key 'runtime\.max_env' in --set runtime\.max_env=3; "
        r"did you mean max_envs_to_visit\?$")):
        _load(tmp_path, "runtime: {}\n", "runtime.max_env=3")


def test_top_k_val_without_validation_freq(tmp_path: Path) -> None:
    """Troubleshooting "Validation scores not tracked": says to set validation_freq."""
    with pytest.raises(ConfigError, match=(
        r"^.*cfg\.yaml: Validation scores not tracked: .*Set runtime\.validation_freq "
        r"\(e\.g\. validation_freq: 50\) to enable validation$")):
        _load(tmp_path, "runtime:\n  checkpoint_strategy: top_k_val\n  checkpoint_keep_last: 3\n")


def test_top_k_val_without_validation_dataset(tmp_path: Path) -> None:
    """top_k_val needs a validation_dataset."""
    with pytest.raises(ConfigError, match=r"Validation scores not tracked: .*needs a "
                       r"validation_dataset.*Set validation\.validation_dataset: built-in"):
        _load(tmp_path, "runtime:\n  checkpoint_strategy: top_k_val\n  validation_freq: 50\n"
              "validation:\n  validation_dataset: null\n")


def test_top_k_val_without_keep_last_keeps_three(tmp_path: Path) -> None:
    """The guide's top_k_val fix snippet sets no K: the default K is 3."""
    cfg = _load(tmp_path, "runtime:\n  validation_freq: 50\n  checkpoint_strategy: top_k_val\n")
    assert cfg.runtime.checkpoint_keep_last == DEFAULT_TOP_K == 3


@pytest.mark.parametrize("value", [0, -1])
def test_keep_last_must_be_positive(tmp_path: Path, value: int) -> None:
    """Troubleshooting "Old checkpoints not deleted": keep_last must be > 0."""
    with pytest.raises(ConfigError, match=(
        rf"Old checkpoints not deleted: runtime\.checkpoint_keep_last must be > 0, "
        rf"got {value}")):
        _load(tmp_path, f"runtime:\n  checkpoint_keep_last: {value}\n")


def test_last_n_without_keep_last(tmp_path: Path) -> None:
    """last_n needs checkpoint_keep_last."""
    with pytest.raises(ConfigError, match=r"checkpoint_strategy last_n needs checkpoint_keep_last"):
        _load(tmp_path, "runtime:\n  checkpoint_strategy: last_n\n")


def test_strategy_all_with_keep_last_is_a_mismatch(tmp_path: Path) -> None:
    """Troubleshooting "Old checkpoints not deleted": strategy mismatch is an error."""
    with pytest.raises(ConfigError, match=(
        r"Old checkpoints not deleted: strategy mismatch\. checkpoint_strategy all keeps every "
        r"checkpoint, so checkpoint_keep_last: 5 has no effect")):
        _load(tmp_path, "runtime:\n  checkpoint_strategy: all\n  checkpoint_keep_last: 5\n")


@pytest.mark.parametrize("value", ["''", "../shared", "a/../../b"])
def test_unusable_checkpoint_dir(tmp_path: Path, value: str) -> None:
    """An empty checkpoint_dir or one leaving the run directory is refused."""
    with pytest.raises(ConfigError, match=r"runtime\.checkpoint_dir .* is unusable"):
        _load(tmp_path, f"runtime:\n  checkpoint_dir: {value}\n")


def test_checkpoint_settings_without_checkpoint_dir(tmp_path: Path) -> None:
    """checkpoint_dir: null turns checkpoints off; checkpoint settings then conflict."""
    with pytest.raises(ConfigError, match=r"checkpoint_dir is null .* but "
                       r"checkpoint_every_episodes is set"):
        _load(tmp_path, "runtime:\n  checkpoint_dir: null\n  checkpoint_every_episodes: 5\n")


def test_validation_without_dataset(tmp_path: Path) -> None:
    """validation_freq with no dataset is refused."""
    with pytest.raises(ConfigError,
                       match=r"validation is enabled .* validation\.validation_dataset is null"):
        _load(tmp_path, "runtime:\n  validation_freq: 5\nvalidation:\n"
              "  validation_dataset: null\n")


@pytest.mark.parametrize("name", ["a/b", "..", ""])
def test_run_name_must_be_plain(tmp_path: Path, name: str) -> None:
    """run_name is one directory name."""
    with pytest.raises(ConfigError, match=r"run_name .* must be a plain directory name"):
        _load(tmp_path, f"run_name: '{name}'\n")


def test_config_is_frozen(tmp_path: Path) -> None:
    """Loaded configs cannot be mutated."""
    cfg = _load(tmp_path, "")
    with pytest.raises(ValueError, match=r"frozen"):
        cfg.runtime.fsync = False  # type: ignore[misc]


def test_dump_config_round_trips(tmp_path: Path) -> None:
    """The resolved config.yaml a run stores loads back to the same configuration."""
    cfg = _load(tmp_path, "runtime:\n  validation_freq: 50\n  checkpoint_strategy: top_k_val\n")
    again = load_config(_write(tmp_path, dump_config(cfg), "resolved.yaml"))
    assert again.model_dump() == cfg.model_dump()
    assert yaml.safe_load(dump_config(cfg))["runtime"]["checkpoint_keep_last"] == 3


def test_duplicate_top_level_key_is_an_error(tmp_path: Path) -> None:
    """Two pasted `runtime:` blocks are refused instead of the first silently vanishing."""
    p = tmp_path / "pasted.yaml"
    p.write_text("runtime:\n  checkpoint_every_episodes: 50\nruntime:\n  max_envs_to_visit: 3\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1: key 'runtime' appears twice; "
                                          r"merge the two blocks into one$"):
        load_config(p)


def test_empty_runtime_section_means_defaults(tmp_path: Path) -> None:
    """`runtime:` with every key commented out is an empty section, not an error."""
    p = tmp_path / "empty_runtime.yaml"
    p.write_text("runtime:\n  # checkpoint_dir: checkpoints\n")
    assert load_config(p).runtime.checkpoint_dir == "checkpoints"
