"""The writer's options, defined once: names, types, defaults and the retention policy.

:class:`WriterOptions` is what :class:`~ckptwriter.CheckpointWriter`,
:class:`~ckptwriter.SyncCheckpointWriter` and the YAML ``runtime:`` section all mean by
"writer options". Each default is written here and nowhere else (the writers' signatures
read them from :data:`DEFAULTS`), and the retention policy is built and validated here,
once, when the options are made.

Invalid values raise :class:`~ckptwriter.ConfigError` with a message that names the
option, the value found and what is allowed; pydantic's own errors never escape.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal, TypedDict

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .retention import Mode, RetentionPolicy, Strategy, make_policy

__all__ = [
    "DEFAULTS",
    "ExecutorKind",
    "OnBacklog",
    "OnError",
    "WriterKwargs",
    "WriterOptions",
]

OnBacklog = Literal["block", "coalesce"]
OnError = Literal["raise", "warn"]
ExecutorKind = Literal["auto", "thread", "process"]

# The message for each option's invalid value. strategy, keep_last, mode and keep_every
# are not here: the retention module owns their rules and messages (see make_policy).
_MESSAGES = {
    "max_pending": "max_pending must be an int >= 1, got {!r}",
    "on_backlog": "on_backlog must be 'block' or 'coalesce', got {!r}",
    "on_error": "on_error must be 'raise' or 'warn', got {!r}",
    "executor": "executor must be 'auto', 'thread' or 'process', got {!r}",
    "fsync": "fsync must be True or False, got {!r}",
    "protect": "protect must be a collection of checkpoint names, e.g. ['ep_000100'], got {!r}",
    "storage_options": "storage_options must be a mapping of fsspec options, e.g. "
    "{{'profile': 'dev'}}, got {!r}",
}


class WriterOptions(BaseModel):
    """How a checkpoint writer queues, writes and retains checkpoints.

    Args:
        strategy: ``all``, ``last_n`` or ``top_k_val``; default ``all`` without
            ``keep_last`` and ``last_n`` with it.
        keep_last: N for ``last_n``, K for ``top_k_val`` (default
            :data:`~ckptwriter.retention.DEFAULT_TOP_K` there).
        mode: ``max`` (default) or ``min``: whether a higher or a lower ``val_score``
            is better, for ``top_k_val``.
        keep_every: checkpoints whose episode is a multiple of this are never deleted
            by ``last_n`` or ``top_k_val`` (milestones).
        max_pending: snapshots that may wait in the queue besides the one being written.
        on_backlog: ``block`` (submit waits for room) or ``coalesce`` (replace the newest
            queued snapshot; submit never waits).
        fsync: make each checkpoint durable before ``latest`` moves.
        on_error: ``raise`` (the next submit/flush/exit raises) or ``warn`` (log, count,
            keep going).
        protect: checkpoint names retention must never delete.
        executor: ``auto``, ``thread`` or ``process``: where the blocking work runs.
        storage_options: passed to fsspec when the checkpoints location is a URL.

    Raises:
        ConfigError: a value is invalid, or ``strategy``/``keep_last`` do not combine
            into a retention policy (the message says how to fix it).
    """

    # strict: True is not a max_pending of 1, and "3" is not a keep_last of 3.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    strategy: Strategy | None = None
    keep_last: int | None = None
    mode: Mode = "max"
    keep_every: int | None = None
    max_pending: int = Field(default=2, ge=1)
    on_backlog: OnBacklog = "block"
    fsync: bool = True
    on_error: OnError = "raise"
    protect: frozenset[str] = frozenset()
    executor: ExecutorKind = "auto"
    storage_options: dict[str, Any] = Field(default_factory=dict)

    _policy: RetentionPolicy = PrivateAttr()

    @model_validator(mode="wrap")
    @classmethod
    def _as_config_error(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            raise _config_error(exc, data) from None

    @field_validator("protect", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        # Any collection of names will do (a list from the wire, a tuple, a set); a
        # string is refused rather than read as a set of one-letter names.
        if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
            return frozenset(value)
        return value

    @field_validator("storage_options", mode="before")
    @classmethod
    def _plain_dict(cls, value: Any) -> Any:
        return dict(value) if isinstance(value, Mapping) else value

    @model_validator(mode="after")
    def _build_policy(self) -> WriterOptions:
        # The one place the retention policy is built and validated; make_policy raises
        # ConfigError, which pydantic passes through unchanged.
        self._policy = make_policy(self.strategy, self.keep_last, mode=self.mode,
                                   keep_every=self.keep_every)
        return self

    @property
    def policy(self) -> RetentionPolicy:
        """The retention policy ``strategy`` and ``keep_last`` describe."""
        return self._policy

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> WriterOptions:
        """A copy; with ``update``, validated again (so ``policy`` follows the new values).

        Raises:
            ConfigError: an updated value is invalid.
        """
        if not update:
            return super().model_copy(deep=deep)
        return type(self).model_validate({**self._fields(), **update})

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    def writer_kwargs(self) -> WriterKwargs:
        """These options as keywords of :class:`~ckptwriter.CheckpointWriter`."""
        return WriterKwargs(
            strategy=self.strategy, keep_last=self.keep_last, mode=self.mode,
            keep_every=self.keep_every, max_pending=self.max_pending,
            on_backlog=self.on_backlog, fsync=self.fsync, on_error=self.on_error,
            protect=self.protect, executor=self.executor,
            storage_options=dict(self.storage_options),
        )

    def to_wire(self) -> dict[str, Any]:
        """These options as plain JSON/msgpack data, for the writer process's open message.

        ``storage_options`` are sent as they are, so they must be plain data too.
        """
        wire = self._fields()
        wire["protect"] = sorted(self.protect)
        wire["storage_options"] = dict(self.storage_options)
        return wire

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> WriterOptions:
        """The options :meth:`to_wire` encoded (validated again, policy included).

        Raises:
            ConfigError: ``data`` does not hold valid writer options.
        """
        return cls.model_validate(dict(data))


class WriterKwargs(TypedDict):
    """:class:`WriterOptions` as ``CheckpointWriter`` keywords: ``**options.writer_kwargs()``."""

    strategy: Strategy | None
    keep_last: int | None
    mode: Mode
    keep_every: int | None
    max_pending: int
    on_backlog: OnBacklog
    fsync: bool
    on_error: OnError
    protect: Collection[str]
    executor: ExecutorKind
    storage_options: Mapping[str, Any] | None


# The writers' signatures take their defaults from here: defined once, in the model.
DEFAULTS = WriterOptions()


def _config_error(exc: ValidationError, data: Any) -> ConfigError:
    """The first problem in ``exc`` as the ConfigError the writer has always raised."""
    if not isinstance(data, Mapping):
        return ConfigError(f"writer options must be a mapping of option names, got {data!r}")
    # Checked first, as the writer always has: retention's rules and messages.
    try:
        make_policy(data.get("strategy"), data.get("keep_last"),
                    mode=data.get("mode", "max"), keep_every=data.get("keep_every"))
    except ConfigError as policy_error:
        return policy_error
    fields = list(WriterOptions.model_fields)
    errors = exc.errors()
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and e["loc"]]
    if unknown:
        return ConfigError(
            f"unknown writer option {unknown[0]!r}; expected one of: {', '.join(fields)}"
        )
    failed = {str(e["loc"][0]) for e in errors if e["loc"]}
    for name in fields:
        if name in failed and name in _MESSAGES:
            return ConfigError(_MESSAGES[name].format(data.get(name)))
    # Not reached for a mapping (every field is covered above); kept so that a new field
    # without a message still gives a ConfigError, never pydantic's text.
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    where = ".".join(str(p) for p in first["loc"]) or "writer options"
    return ConfigError(f"{where}: {first['msg']}")
