"""WriterOptions: defaults defined once, one policy, the old messages, the wire encoding."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ckptwriter import CheckpointWriter, ConfigError, MemoryLog, SyncCheckpointWriter
from ckptwriter import options as options_module
from ckptwriter.config import Config, RuntimeConfig, load_config
from ckptwriter.options import DEFAULTS, WriterKwargs, WriterOptions
from ckptwriter.retention import DEFAULT_TOP_K, KeepLastN, KeepTopKByScore
from conftest import add_episode, snapshot

# Writer arguments that are not options: where checkpoints go.
_NOT_OPTIONS = {"checkpoint_dir", "storage"}


def _field_default(name: str) -> Any:
    return WriterOptions.model_fields[name].get_default(call_default_factory=True)


def _as_option(name: str, value: Any) -> Any:
    # The writers take storage_options=None for "none"; the model holds an empty dict.
    return {} if name == "storage_options" and value is None else value


@pytest.mark.parametrize("writer", [
    pytest.param(CheckpointWriter, id="async"),
    pytest.param(SyncCheckpointWriter, id="sync"),
])
def test_writer_defaults_are_the_options_defaults(writer: type) -> None:
    """Every option is a keyword of the writer, defaulting to WriterOptions' default."""
    params = inspect.signature(writer).parameters
    assert set(params) - _NOT_OPTIONS == set(WriterOptions.model_fields)
    for name in WriterOptions.model_fields:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert _as_option(name, params[name].default) == _field_default(name), name


def test_sync_writer_has_the_async_signature() -> None:
    """SyncCheckpointWriter's signature is CheckpointWriter's: names, kinds, types, defaults."""
    assert inspect.signature(SyncCheckpointWriter) == inspect.signature(CheckpointWriter)


def test_writer_kwargs_name_every_option() -> None:
    """WriterKwargs (what writer_kwargs returns) lists exactly the options."""
    assert set(WriterKwargs.__annotations__) == set(WriterOptions.model_fields)
    assert set(DEFAULTS.writer_kwargs()) == set(WriterOptions.model_fields)


def test_yaml_runtime_defaults_are_the_options_defaults() -> None:
    """The YAML runtime section's writer keys default to WriterOptions' defaults."""
    assert RuntimeConfig().writer_options() == DEFAULTS


def test_yaml_maps_onto_writer_options(tmp_path: Path) -> None:
    """runtime: keys reach WriterOptions under the writer's names."""
    path = tmp_path / "cfg.yaml"
    path.write_text("runtime:\n  checkpoint_strategy: last_n\n  checkpoint_keep_last: 4\n"
                    "  max_pending: 5\n  on_backlog: coalesce\n  on_error: warn\n"
                    "  fsync: false\n  executor: thread\n")
    got = load_config(path).runtime.writer_options()
    assert got == WriterOptions(strategy="last_n", keep_last=4, max_pending=5,
                                on_backlog="coalesce", on_error="warn", fsync=False,
                                executor="thread")
    assert got.policy == KeepLastN(4)


def test_yaml_and_library_agree_on_top_k_default(tmp_path: Path) -> None:
    """top_k_val without K: the YAML and CheckpointWriter both keep the 3 best."""
    path = tmp_path / "cfg.yaml"
    path.write_text("runtime:\n  validation_freq: 50\n  checkpoint_strategy: top_k_val\n")
    cfg: Config = load_config(path)
    CheckpointWriter(tmp_path / "ck", strategy="top_k_val", executor="thread")  # no raise
    assert cfg.runtime.checkpoint_keep_last == DEFAULT_TOP_K == 3
    library = WriterOptions(strategy="top_k_val").policy
    assert library == cfg.runtime.writer_options().policy == KeepTopKByScore(3)


@pytest.mark.anyio
@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_top_k_val_writer_without_keep_last_keeps_three(
    tmp_path: Path, executor: Any
) -> None:
    """The guide's top_k_val timeline, with no keep_last given, on both executors."""
    mem = MemoryLog()
    scores = {50: 0.45, 100: 0.52, 150: 0.48, 200: 0.55, 250: 0.51}
    async with CheckpointWriter(tmp_path, strategy="top_k_val", fsync=False,
                                executor=executor) as w:
        for ep, score in scores.items():
            add_episode(mem, ep)
            await (await w.submit(snapshot(mem, ep, val_score=score))).wait()
    assert sorted(p.name for p in tmp_path.glob("ep_*")) == [
        "ep_000100", "ep_000200", "ep_000250"]


@pytest.mark.parametrize(("options", "message"), [
    pytest.param({"max_pending": 0}, r"^max_pending must be an int >= 1, got 0$", id="pending-0"),
    pytest.param({"max_pending": True}, r"^max_pending must be an int >= 1, got True$",
                 id="pending-bool"),
    pytest.param({"max_pending": "2"}, r"^max_pending must be an int >= 1, got '2'$",
                 id="pending-str"),
    pytest.param({"on_backlog": "drop"},
                 r"^on_backlog must be 'block' or 'coalesce', got 'drop'$", id="backlog"),
    pytest.param({"on_error": "ignore"}, r"^on_error must be 'raise' or 'warn', got 'ignore'$",
                 id="on-error"),
    pytest.param({"executor": "gpu"},
                 r"^executor must be 'auto', 'thread' or 'process', got 'gpu'$", id="executor"),
    pytest.param({"keep_last": 0}, r"^checkpoint_keep_last must be > 0, got 0; remove it",
                 id="keep-0"),
    pytest.param({"keep_last": "3"}, r"^checkpoint_keep_last must be > 0, got '3'",
                 id="keep-str"),
    pytest.param({"strategy": "best"}, r"^unknown checkpoint_strategy 'best'", id="strategy"),
    pytest.param({"strategy": "last_n"},
                 r"^checkpoint_strategy last_n needs checkpoint_keep_last", id="last-n"),
    pytest.param({"keep_last": 0, "on_backlog": "drop"},
                 r"^checkpoint_keep_last must be > 0, got 0", id="policy-first"),
    pytest.param({"fsync": 1}, r"^fsync must be True or False, got 1$", id="fsync"),
    pytest.param({"protect": "ep_000100"},
                 r"^protect must be a collection of checkpoint names, .*got 'ep_000100'$",
                 id="protect-str"),
    pytest.param({"storage_options": 3},
                 r"^storage_options must be a mapping of fsspec options, .*got 3$",
                 id="storage-options"),
])
def test_bad_values_are_config_errors(tmp_path: Path, options: dict[str, Any],
                                      message: str) -> None:
    """Bad options raise ConfigError with the writer's messages, from the model and writer."""
    with pytest.raises(ConfigError, match=message):
        WriterOptions.model_validate(options)
    with pytest.raises(ConfigError, match=message):
        CheckpointWriter(tmp_path, **{"executor": "thread", **options})


def test_unknown_option_is_a_config_error() -> None:
    """An unknown option names itself and the valid ones, not pydantic's text."""
    with pytest.raises(ConfigError, match=(
            r"^unknown writer option 'keep'; expected one of: strategy, keep_last, ")):
        WriterOptions.model_validate({"keep": 3})


def test_options_are_frozen() -> None:
    """WriterOptions cannot be changed in place."""
    with pytest.raises(ValueError, match=r"frozen"):
        DEFAULTS.max_pending = 5  # type: ignore[misc]


def test_model_copy_validates_the_update() -> None:
    """model_copy(update=...) builds the policy again and refuses bad values."""
    base = WriterOptions(strategy="top_k_val")
    assert base.model_copy(update={"keep_last": 5}).policy == KeepTopKByScore(5)
    with pytest.raises(ConfigError, match=r"^checkpoint_keep_last must be > 0, got 0"):
        base.model_copy(update={"keep_last": 0})


def test_policy_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread writer builds its retention policy once, in WriterOptions."""
    calls: list[tuple[Any, Any]] = []
    real = options_module.make_policy

    def counting(strategy: Any, keep_last: Any, **kw: Any) -> Any:
        calls.append((strategy, keep_last))
        return real(strategy, keep_last, **kw)

    monkeypatch.setattr(options_module, "make_policy", counting)
    CheckpointWriter(tmp_path, keep_last=2, executor="thread")
    assert calls == [(None, 2)]


def test_storage_options_need_a_url_not_a_storage_object(tmp_path: Path) -> None:
    """storage_options with a storage object is refused: they would be ignored."""
    from ckptwriter.storage import LocalStorage

    with pytest.raises(ConfigError, match=r"^storage_options apply to a checkpoint_dir URL"):
        CheckpointWriter(storage=LocalStorage(tmp_path), storage_options={"anon": True})


def test_wire_round_trip() -> None:
    """to_wire is plain msgpack/JSON data and from_wire gives back equal options."""
    opts = WriterOptions(strategy="top_k_val", keep_last=4, max_pending=3,
                         on_backlog="coalesce", fsync=False, on_error="warn",
                         protect=frozenset({"ep_000200", "ep_000100"}), executor="process",
                         storage_options={"profile": "dev", "client_kwargs": {"region": "x"}})
    wire = opts.to_wire()
    assert wire["protect"] == ["ep_000100", "ep_000200"]
    for decoded in (msgspec.msgpack.decode(msgspec.msgpack.encode(wire)),
                    json.loads(json.dumps(wire))):
        again = WriterOptions.from_wire(decoded)
        assert again == opts
        assert again.policy == opts.policy == KeepTopKByScore(4)


def test_from_wire_refuses_bad_data() -> None:
    """from_wire validates like the constructor."""
    with pytest.raises(ConfigError, match=r"^on_error must be 'raise' or 'warn', got 'x'$"):
        WriterOptions.from_wire({**DEFAULTS.to_wire(), "on_error": "x"})


@pytest.mark.anyio
@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_mode_min_and_keep_every_through_a_writer(tmp_path: Path, executor: str) -> None:
    """The writer's mode= and keep_every= reach retention, in the writer process too."""
    from ckptwriter import MemoryLog, Snapshot

    mem = MemoryLog()
    losses = {1: 0.9, 2: 0.2, 3: 0.8, 4: 0.1, 5: 0.7, 6: 0.6}
    async with CheckpointWriter(tmp_path, strategy="top_k_val", keep_last=2, mode="min",
                                keep_every=3, executor=executor) as w:  # type: ignore[arg-type]
        for ep, loss in losses.items():
            await (await w.submit(Snapshot(ep, ep, "A", mem, val_score=loss))).wait()
    names = sorted(p.name for p in tmp_path.glob("ep_*"))
    # Lowest two losses (ep 2, 4), the milestones (3, 6) and latest (6).
    assert names == ["ep_000002", "ep_000003", "ep_000004", "ep_000006"]


def test_invalid_mode_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^checkpoint_mode must be 'max' or 'min'"):
        CheckpointWriter(tmp_path, mode="best")  # type: ignore[arg-type]
