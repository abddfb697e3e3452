"""The training configuration: pydantic models of the YAML file, loaded in one place.

Every guide snippet holds only a ``runtime:`` section; everything else has defaults, so
each snippet runs as it is. :func:`load_config` is the one place a file is read: plain
``yaml.safe_load``, size and shape limits, then the models (``extra="forbid"``, strict
types) and the guide's rules, all reported as :class:`ConfigError` before any episode.

Data flow: :mod:`.config_yaml` turns the file and ``--set`` overrides into plain data;
the models here validate it, :mod:`.config_errors` words what they reject, and the
guide's rules below check what the types cannot.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
)

from .config_errors import explain_validation_error
from .config_yaml import (
    apply_overrides,
    check_shape,
    describe_kind,
    parse_overrides,
    parse_yaml,
    read_config_file,
)
from .errors import ConfigError
from .options import DEFAULTS, ExecutorKind, OnBacklog, OnError, WriterOptions
from .retention import DEFAULT_TOP_K, Mode, Strategy
from .state_codec import encode_json

__all__ = [
    "DEFAULT_MAX_ENVS_TO_VISIT",
    "DEFAULT_TOP_K",
    "RESUME_AUTO",
    "AgentConfig",
    "Config",
    "EnvironmentConfig",
    "RuntimeConfig",
    "ValidationConfig",
    "dump_config",
    "load_config",
    "parse_overrides",
]

# A guide snippet without max_envs_to_visit must still finish quickly: the guide calls
# runs under 100 episodes "quick experiments".
DEFAULT_MAX_ENVS_TO_VISIT = 100
BUILTIN_DATASET = "built-in"
# resume_from: auto resumes this run name's newest valid checkpoint, or starts fresh.
RESUME_AUTO = "auto"
# The keys holding a path: `~` and $VARS are expanded in them (as a shell would).
_PATH_KEYS = ("output_dir", "runtime.checkpoint_dir", "runtime.resume_from",
              "validation.validation_dataset")
_UNSET_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


class _Section(BaseModel):
    # strict: "5" is not silently an int, "yes" not a bool; YAML already gives real types.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class RuntimeConfig(_Section):
    """The ``runtime:`` section: training length, validation, checkpointing, writer."""

    max_envs_to_visit: PositiveInt | None = Field(
        default=None,
        description=f"episodes in total; default {DEFAULT_MAX_ENVS_TO_VISIT}, or "
        f"{DEFAULT_MAX_ENVS_TO_VISIT} more than the checkpoint when resuming",
    )
    checkpoint_dir: str | None = Field(
        default="checkpoints",
        description="checkpoints directory, relative to the run directory; null: no checkpoints",
    )
    checkpoint_every_episodes: PositiveInt | None = None
    checkpoint_every_seconds: PositiveFloat | None = Field(
        default=None,
        description="also checkpoint once this many seconds passed since the last one "
        "(checked at the end of each episode; with checkpoint_every_episodes, whichever "
        "comes first)",
    )
    checkpoint_keep_last: int | None = None
    checkpoint_strategy: Strategy | None = None
    checkpoint_mode: Mode = Field(
        default="max", description="max: a higher val_score is better (top_k_val, best); min: lower"
    )
    checkpoint_keep_every: int | None = Field(
        default=None,
        description="checkpoints whose episode is a multiple of this are never deleted",
    )
    checkpoint_on_start: bool = False
    checkpoint_on_exception: bool = Field(
        default=True,
        description="when the agent or environment raises, checkpoint the last completed "
        "episode before exiting",
    )
    resume_from: str | None = Field(
        default=None,
        description="a checkpoint, checkpoints dir, run dir, outputs/<run_name>, .../best, "
        "best (this run name's newest best) or auto (newest checkpoint of this run name, "
        "continued in place; a fresh start if there is none)",
    )
    validation_freq: PositiveInt | None = None
    run_validation_at_start: bool = False
    # The writer's own types and defaults (WriterOptions), so YAML and library agree.
    max_pending: PositiveInt = DEFAULTS.max_pending
    on_backlog: OnBacklog = DEFAULTS.on_backlog
    on_error: OnError = DEFAULTS.on_error
    fsync: bool = DEFAULTS.fsync
    executor: ExecutorKind = Field(
        default=DEFAULTS.executor,
        description="where checkpoint writes run: a writer process (auto on POSIX) or a thread",
    )

    def writer_options(self) -> WriterOptions:
        """The writer options this section sets: the one YAML-to-writer mapping.

        Raises:
            ConfigError: ``checkpoint_strategy``/``checkpoint_keep_last`` do not combine
                into a retention policy (retention's message, unprefixed).
        """
        return WriterOptions(
            strategy=self.checkpoint_strategy, keep_last=self.checkpoint_keep_last,
            mode=self.checkpoint_mode, keep_every=self.checkpoint_keep_every,
            max_pending=self.max_pending, on_backlog=self.on_backlog, fsync=self.fsync,
            on_error=self.on_error, executor=self.executor,
        )

    def episodes_for(self, start_episode: int) -> int:
        """The last episode of a run starting after ``start_episode`` (0 unless resumed)."""
        if self.max_envs_to_visit is not None:
            return self.max_envs_to_visit
        return start_episode + DEFAULT_MAX_ENVS_TO_VISIT


class AgentConfig(_Section):
    """The ``agent:`` section: a built-in agent name or a ``module:Class`` path."""

    type: str = "HistoryAgent"
    memory_type: str = "history"
    config: dict[str, Any] = Field(default_factory=dict)


class EnvironmentConfig(_Section):
    """The ``environment:`` section: the built-in deterministic arithmetic tasks."""

    type: Literal["arithmetic"] = "arithmetic"
    seed: int = 0
    num_tasks: PositiveInt = Field(default=200, le=1000)
    max_operand: PositiveInt = Field(default=20, le=1000)
    max_attempts: PositiveInt = Field(default=2, le=100)


class ValidationConfig(_Section):
    """The ``validation:`` section: what ``validation_freq`` evaluates the agent on."""

    validation_dataset: str | None = BUILTIN_DATASET
    size: PositiveInt = Field(default=50, le=10_000)


class Config(_Section):
    """A whole training configuration file."""

    run_name: str | None = None
    output_dir: str = "outputs"
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    _source: str = PrivateAttr(default="<config>")

    @property
    def name(self) -> str:
        """The run name (always set by :func:`load_config`)."""
        return self.run_name or "run"

    @property
    def source(self) -> str:
        """Where the configuration came from (the file), for messages."""
        return self._source


# -- loading ---------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Read, validate and resolve a configuration file.

    Args:
        path: the YAML file.
        overrides: ``"runtime.KEY=VALUE"`` strings (``--set``); the value is YAML.

    Returns:
        the frozen configuration; ``run_name`` defaults to the file's stem and, under
        ``top_k_val`` without ``checkpoint_keep_last``, K is :data:`DEFAULT_TOP_K`.

    Raises:
        ConfigError: the file cannot be read or parsed, a key is unknown (the closest
            valid key is suggested), a value has the wrong type, or a rule of the
            checkpointing guide is broken. The message names the file and the key.
    """
    src = str(path)
    p = Path(path)
    text = read_config_file(path)
    data = parse_yaml(text, src)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{src}: the top level must be a mapping (e.g. `runtime:`), "
            f"found {describe_kind(data)}"
        )
    for section in ("runtime", "agent", "environment", "validation"):
        # `runtime:` with every key commented out is an empty section, as an empty file
        # is an empty config.
        if section in data and data[section] is None:
            data[section] = {}
    set_keys = apply_overrides(data, overrides)
    if data.get("run_name") is None:
        data["run_name"] = p.stem
    return build_config(data, source=src, set_keys=set_keys)


def build_config(
    data: Mapping[str, Any], *, source: str = "<config>", set_keys: Mapping[str, str] | None = None
) -> Config:
    """Validate an already parsed document (what :func:`load_config` does after parsing).

    Raises:
        ConfigError: see :func:`load_config`.
    """
    check_shape(data, source)
    data = _expand_paths(data, source)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            explain_validation_error(exc, source, set_keys or {}, root=Config)
        ) from None
    cfg._source = source
    return _check_rules(cfg)


def _expand_paths(data: Mapping[str, Any], src: str) -> Mapping[str, Any]:
    """``~`` and ``$VAR``/``${VAR}`` expanded in the path keys, as a shell would.

    An unset variable is an error naming it: left as it is, ``$SCRATCH/ckpts`` would
    become a directory literally named ``$SCRATCH`` under the run directory.
    """
    out = dict(data)
    for dotted in _PATH_KEYS:
        section, _, key = dotted.rpartition(".")
        holder = out.get(section) if section else out
        if not isinstance(holder, Mapping) or not isinstance(holder.get(key), str):
            continue
        value = os.path.expanduser(os.path.expandvars(holder[key]))
        unset = _UNSET_VAR.search(value)
        if unset is not None:
            raise ConfigError(
                f"{src}: {dotted} {holder[key]!r}: environment variable "
                f"{unset.group(1).strip('{}')} is not set; set it or write the path out"
            )
        if value != holder[key]:
            holder = {**holder, key: value}
            if section:
                out[section] = holder
            else:
                out = holder
    return out


# -- the guide's rules -----------------------------------------------------------------


def _check_rules(cfg: Config) -> Config:
    rt, src = cfg.runtime, cfg.source

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{src}: {msg}")

    _check_plain_name(cfg.run_name or "", "run_name", src)
    try:
        # It becomes Snapshot.agent_config, stored in agent.json: refused here, where the
        # file can be fixed, rather than at the first checkpoint (.nan, a YAML date).
        encode_json(cfg.agent.config, "agent.config", fix=_AGENT_CONFIG_FIX,
                    own="a value of its own")
    except (TypeError, ValueError) as exc:
        raise fail(str(exc)) from None
    if not cfg.output_dir or "\x00" in cfg.output_dir:
        raise fail("output_dir must be a directory path, e.g. output_dir: outputs")
    if rt.checkpoint_dir is None:
        used = [k for k in ("checkpoint_every_episodes", "checkpoint_every_seconds",
                            "checkpoint_keep_last", "checkpoint_strategy",
                            "checkpoint_keep_every") if getattr(rt, k) is not None]
        if rt.checkpoint_on_start:
            used.append("checkpoint_on_start")
        if used:
            raise fail(
                f"runtime.checkpoint_dir is null (checkpointing off) but {', '.join(used)} "
                "is set; set checkpoint_dir: checkpoints to save checkpoints"
            )
    else:
        _check_checkpoint_dir(rt.checkpoint_dir, src)
    if rt.resume_from is not None and (not rt.resume_from.strip() or "\x00" in rt.resume_from):
        raise fail(
            f"runtime.resume_from {rt.resume_from!r} names no checkpoint; set it to a "
            "checkpoint path, outputs/<run_name>, best or auto, or remove it to start fresh"
        )

    if rt.checkpoint_strategy == "top_k_val":
        if rt.validation_freq is None:
            raise fail(
                "Validation scores not tracked: checkpoint_strategy top_k_val keeps the "
                "best checkpoints by validation score, but validation is off. "
                "Set runtime.validation_freq (e.g. validation_freq: 50) to enable validation"
            )
        if cfg.validation.validation_dataset is None:
            raise fail(
                "Validation scores not tracked: checkpoint_strategy top_k_val needs a "
                "validation_dataset, but validation.validation_dataset is null. "
                f"Set validation.validation_dataset: {BUILTIN_DATASET} (or a JSONL file)"
            )
    elif rt.checkpoint_strategy == "all" and rt.checkpoint_keep_last is not None:
        raise fail(
            "Old checkpoints not deleted: strategy mismatch. checkpoint_strategy all keeps "
            f"every checkpoint, so checkpoint_keep_last: {rt.checkpoint_keep_last} has no "
            "effect. Set checkpoint_strategy: last_n to keep only the newest "
            f"{rt.checkpoint_keep_last}, or remove checkpoint_keep_last"
        )
    if cfg.validation.validation_dataset is None and (
        rt.validation_freq is not None or rt.run_validation_at_start
    ):
        raise fail(
            "validation is enabled (validation_freq / run_validation_at_start) but "
            f"validation.validation_dataset is null; set it to {BUILTIN_DATASET} or a JSONL file"
        )
    keep_last = rt.checkpoint_keep_last
    try:
        # The writer's options own the strategy rules (keep_last > 0, last_n needs N).
        rt.writer_options()
    except ConfigError as exc:
        why = "Old checkpoints not deleted: " if keep_last is not None and keep_last <= 0 else ""
        raise fail(f"{why}runtime.{exc}") from None
    if rt.checkpoint_strategy == "top_k_val" and keep_last is None:
        # Recorded in config.yaml: the K the writer applies (retention's default).
        keep_last = DEFAULT_TOP_K
    if keep_last != rt.checkpoint_keep_last:
        cfg = cfg.model_copy(
            update={"runtime": rt.model_copy(update={"checkpoint_keep_last": keep_last})}
        )
    return cfg


_AGENT_CONFIG_FIX = ("agent.config holds plain JSON data: mappings, lists, strings, numbers "
                     "(no .nan or .inf), booleans and null; quote a date to keep it a string")


def _check_plain_name(value: str, key: str, src: str) -> None:
    if not value or value in {".", ".."} or "/" in value or "\\" in value or "\x00" in value:
        raise ConfigError(
            f"{src}: {key} {value!r} must be a plain directory name, e.g. {key}: my_run"
        )


def _check_checkpoint_dir(value: str, src: str) -> None:
    if not value.strip() or "\x00" in value:
        raise ConfigError(
            f"{src}: runtime.checkpoint_dir {value!r} is unusable; "
            "use a directory name such as checkpoint_dir: checkpoints"
        )
    pure = PurePath(value)
    if not pure.is_absolute() and ".." in pure.parts:
        raise ConfigError(
            f"{src}: runtime.checkpoint_dir {value!r} is unusable: it leaves the run "
            "directory, so runs would share (and lock) one checkpoints directory. "
            "Use a name inside the run directory, e.g. checkpoints, or an absolute path"
        )


def dump_config(cfg: Config) -> str:
    """The resolved configuration as YAML (what a run stores in ``config.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
