"""The one exception hierarchy of ckptwriter.

Every error the library raises on purpose derives from :class:`CheckpointError`, so
``except CheckpointError`` is enough for a caller that wants to report and stop::

    CheckpointError
    ├── ConfigError                  a configuration file or value is unusable
    ├── CheckpointNotFoundError      a path names no checkpoint ("Checkpoint not found")
    ├── CheckpointExistsError        submit of an episode already there, or below the newest
    ├── CheckpointCorruptError       a checkpoint exists but a file is missing or damaged
    │   └── UnsafePathError          a manifest or pointer tries to leave its directory
    ├── MemoryTypeMismatchError      the checkpoint's memory type differs from the agent's
    │   ├── UnknownEntryTypeError    the memory holds entry types the caller did not pass
    │   │   └── UnknownStateTypeError  a state key holds a model of a class not passed
    │   └── ClassMismatchError       an entry or state class changed since it was written
    ├── StorageError                 the disk or store refused an operation (ENOSPC, EACCES...)
    ├── DirectoryLockedError         another live writer owns the checkpoints directory
    ├── WriterClosedError            submit/flush on a writer that is closed or not started
    └── WriterFailedError            a background write failed; raised on the next call

Messages say what was expected, what was found and what to do. Only
:class:`CheckpointCorruptError` (damage) makes ``latest`` fall back to an older checkpoint;
a :class:`MemoryTypeMismatchError` is about the caller's classes, which every checkpoint
of the run would meet, and is raised as it is.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ClassMismatchError",
    "ConfigError",
    "DirectoryLockedError",
    "MemoryTypeMismatchError",
    "StorageError",
    "UnknownEntryTypeError",
    "UnknownStateTypeError",
    "UnsafePathError",
    "WriterClosedError",
    "WriterFailedError",
]


class CheckpointError(Exception):
    """Root of every error ckptwriter raises on purpose."""


class ConfigError(CheckpointError):
    """A configuration file or value cannot be used."""


class CheckpointNotFoundError(CheckpointError):
    """A path does not name a checkpoint."""

    def __init__(self, path: str | Path, nearby: list[str] | None = None, hint: str = "",
                 *, searched: bool = True) -> None:
        self.path = str(path)
        self.nearby = list(nearby or [])
        lines = [f"Checkpoint not found: {self.path}"]
        if hint:
            lines.append(hint)
        if self.nearby:
            lines.append("Checkpoints that do exist nearby:")
            lines.extend(f"  {p}" for p in self.nearby)
        elif searched:
            lines.append("No checkpoints exist nearby either.")
        super().__init__("\n".join(lines))


class CheckpointExistsError(CheckpointError):
    """``submit`` of an episode the directory (or this writer's queue) already holds, or
    of one below the newest there: raised at once, unless ``submit(..., replace=True)``.

    Attributes:
        episode_index: the episode submitted.
        directory: the checkpoints directory.
        newest_episode: the newest episode committed there or submitted to the writer.
        reason: ``"exists"`` (committed there), ``"pending"`` (submitted to this writer,
            not written yet) or ``"behind"`` (below the newest, another history).
    """

    def __init__(self, episode_index: int, directory: str, newest_episode: int,
                 reason: str) -> None:
        self.episode_index = episode_index
        self.directory = directory
        self.newest_episode = newest_episode
        self.reason = reason
        name = f"ep_{episode_index:06d}"
        what = {
            "exists": f"episode {episode_index} is already checkpointed in {directory} "
                      f"({name}; the newest there is episode {newest_episode})",
            "pending": f"episode {episode_index} was already submitted to this writer and "
                       f"is not written yet (to {directory}; the newest submitted is "
                       f"episode {newest_episode})",
            "behind": f"episode {episode_index} is below the newest checkpoint in "
                      f"{directory}, episode {newest_episode}: writing it would go back "
                      "in that history (retention, which orders by episode, would delete "
                      "it first, and latest would move back)",
        }[reason]
        # A resume that loaded latest before a writer opened the directory may have
        # loaded a pointer a killed run left behind (the writer's open moves it on).
        lagged = (f" If this run resumed from a checkpoint below episode {newest_episode}, "
                  f"load the directory again now: latest names the newest committed one "
                  f"once a writer has opened it." if reason == "exists" else "")
        super().__init__(
            f"Not saved: {what}. Write to a new checkpoint directory, continue from an "
            f"episode above {newest_episode}, or pass replace=True to submit() to write "
            f"{name} anyway (latest then names it).{lagged}"
        )


class CheckpointCorruptError(CheckpointError):
    """A checkpoint directory exists but one of its files is missing or damaged."""

    def __init__(self, checkpoint: str | Path, file: str, problem: str) -> None:
        self.checkpoint = str(checkpoint)
        self.file = file
        self.problem = problem
        super().__init__(
            f"Checkpoint {self.checkpoint} is broken: {file}: {problem}. "
            "Resume from another checkpoint (`ckptwriter verify DIR` checks them all) "
            "or from `latest`, which falls back to the newest valid one."
        )


def all_broken(shown: str, where: str, why: str,
               broken: list[CheckpointCorruptError]) -> CheckpointNotFoundError:
    """No valid checkpoint in ``where`` because every one there is damaged (a file all of
    them share, say): each is named, and none is offered as an alternative."""
    each = "; ".join(f"{Path(e.checkpoint).name}: {e.file}: {e.problem}" for e in broken)
    return CheckpointNotFoundError(shown, [], searched=False, hint=(
        f"No valid checkpoint in {where} ({why}). Every checkpoint there is broken: {each}. "
        f"`ckptwriter verify {where}` checks each one."))


class UnsafePathError(CheckpointCorruptError):
    """A manifest or pointer names a path outside its checkpoint directory."""

    def __init__(self, checkpoint: str | Path, file: str, problem: str) -> None:
        super().__init__(checkpoint, file, problem)
        # Not followed, so nothing to fall back from: say how to get past it.
        pointer = file.removesuffix(".json")
        fix = (f"or remove {file}: a writer opening the directory points {pointer} at "
               f"the right checkpoint again" if pointer in ("latest", "best")
               else f"or remove {file}")
        self.args = (
            f"Checkpoint {self.checkpoint} is broken: {file}: {problem}. Nothing was read "
            f"through it. Load a checkpoint by its name (`ckptwriter ls` lists them), "
            f"{fix}.",
        )


class MemoryTypeMismatchError(CheckpointError):
    """The memory stored in a checkpoint is not the type the agent uses."""

    def __init__(self, checkpoint: str | Path, found: str, expected: str) -> None:
        self.found = found
        self.expected = expected
        super().__init__(
            f"Memory not restored: checkpoint {checkpoint} holds memory_type {found!r} "
            f"but the agent uses memory_type {expected!r}. "
            f"Set agent.memory_type: {found} or resume from a checkpoint of a {expected!r} agent."
        )


class UnknownEntryTypeError(MemoryTypeMismatchError):
    """A memory file holds entries whose ``type`` tag names no type the caller passed.

    A checkpoint never imports code: the classes of its entries are the caller's to
    pass, as ``load_checkpoint(..., entry_types=[...])``.
    """

    def __init__(self, source: str, tags: dict[str, int], known: list[str]) -> None:
        # Not MemoryTypeMismatchError.__init__: the message is about entry tags.
        CheckpointError.__init__(self, _unknown_tags_message(source, tags, known))
        self.source = source
        self.tags = dict(tags)
        self.found = ", ".join(tags)
        self.expected = ", ".join(known)


def _unknown_tags_message(source: str, tags: dict[str, int], known: list[str]) -> str:
    found = ", ".join(f"{t!r} (first on line {line})" for t, line in tags.items())
    names = ", ".join(tags)
    return (
        f"Memory not restored: {source} holds entries of type {found}, which no type "
        f"passed in entry_types= has as its tag (known: {', '.join(known)}). Pass the "
        f"classes: load_checkpoint(path, entry_types=[{names}]), or read plain dicts "
        "with load_checkpoint(path, raw=True)."
    )


class UnknownStateTypeError(UnknownEntryTypeError):
    """A state key holds a model whose class the caller did not pass in ``state_types=``."""

    def __init__(self, source: str, key: str, cls: str, tag: str, known: list[str]) -> None:
        name = cls.rpartition(":")[2] or tag
        CheckpointError.__init__(
            self,
            f"State not restored: {source} holds state[{key!r}], a {cls} (tag {tag!r}), and "
            f"no class passed in state_types= has that tag (known: {', '.join(known)}). "
            f"Pass the class: load_checkpoint(path, state_types=[{name}]), or read it as "
            "plain data with load_checkpoint(path, raw=True).")
        self.source = source
        self.key = key
        self.cls = cls
        self.tags = {tag: 0}
        self.found = tag
        self.expected = ", ".join(known)


class ClassMismatchError(MemoryTypeMismatchError):
    """An entry or state value does not fit the class passed for its tag.

    The class changed since the checkpoint was written (a field renamed, removed, added
    without a default, or given another type). The checkpoint is not damaged (its
    checksums match), so ``latest`` does not fall back to an older one: every checkpoint
    holding such a value would meet the same class.

    Attributes:
        source: the checkpoint.
        where: the file and line (an entry) or the state key and file (a state value).
        tag: the value's ``type`` tag.
        cls: the class passed for that tag (``module:QualName``).
        written_by: the class recorded when the checkpoint was written.
        problem: which fields differ: what the checkpoint holds, what the class expects.
    """

    def __init__(self, section: str, source: str, where: str, tag: str, cls: str,
                 written_by: str, problem: str, fix: str) -> None:
        # Not MemoryTypeMismatchError.__init__: the message is about one class.
        CheckpointError.__init__(
            self,
            f"{section} not restored: checkpoint {source} ({where}) holds a {tag!r} "
            f"{'value' if section == 'State' else 'entry'} that does not fit {cls}, the "
            f"class passed for that tag: {problem}. It was written by {written_by} as that "
            "class was then (its fields changed since); the checkpoint is not damaged "
            "(`ckptwriter verify` finds it whole), and no older checkpoint is loaded in its "
            f"place. Fix the class ({fix}), or migrate the checkpoint: read it with "
            "load_checkpoint(path, raw=True) and write what it holds, converted, with the "
            "class as it is now.")
        self.source = source
        self.where = where
        self.tag = tag
        self.cls = cls
        self.written_by = written_by
        self.problem = problem
        self.found = written_by
        self.expected = cls


class StorageError(CheckpointError):
    """The filesystem or object store refused an operation."""


class DirectoryLockedError(CheckpointError):
    """Another live writer holds the lock on a checkpoints directory."""


class WriterClosedError(CheckpointError):
    """The writer is not running: not entered yet, or already closed."""


class WriterFailedError(CheckpointError):
    """A background checkpoint write failed; the cause is chained as ``__cause__``."""
