"""Names and paths: checkpoint directories, run directories, temp and trash names."""

from __future__ import annotations

import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

__all__ = [
    "AGENT_JSON",
    "BEST_JSON",
    "BEST_LINK",
    "LATEST_JSON",
    "LATEST_LINK",
    "RUNTIME_JSON",
    "checkpoint_name",
    "create_run_dir",
    "memory_file_name",
    "parse_checkpoint_name",
    "path_text",
    "run_sort_key",
]

RUNTIME_JSON = "runtime.json"
AGENT_JSON = "agent.json"
LATEST_LINK = "latest"
LATEST_JSON = "latest.json"
# The best-scoring checkpoint by the writer's mode, a pointer like latest (same schema).
BEST_LINK = "best"
BEST_JSON = "best.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# A checkpoint moved aside while the same episode is committed again: unlike trash, it is
# put back if a crash left its name empty.
REPLACED_PREFIX = ".replaced-"
FORMAT_VERSION = 1

# ASCII digits only (``\d`` takes any script's), at most 18 of them: int() of a planted
# name of thousands of digits raises, and no real run counts past 10**18 episodes.
MAX_EPISODE_INDEX = 10**18 - 1
_NAME_RE = re.compile(r"ep_([0-9]{6,18})")
RUN_DIR_RE = re.compile(r"^[0-9]{8}_[0-9]{6}(?:_[0-9]+)?\Z")
_DIGITS_RE = re.compile(r"([0-9]+)")


def checkpoint_name(episode_index: int) -> str:
    """``ep_000100`` for episode 100 (more digits past 999999)."""
    return f"ep_{episode_index:06d}"


def parse_checkpoint_name(name: str) -> int | None:
    """The episode index of a checkpoint directory name, or None if it is not one."""
    m = _NAME_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def run_sort_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """The one order of run directories (and of the names above them): natural order.

    Runs started in the same second are ``<stamp>``, ``<stamp>_1`` ... ``<stamp>_10``; by
    plain string order ``_10`` would sort before ``_2`` and resume would pick an older run
    as the newest. Digit runs compare as numbers, everything else as text.
    """
    # A digit run compares by its length without leading zeros, then as text: the order
    # of the numbers, without int() (which refuses a planted name of 5,000 digits).
    return tuple(
        (0, len(part.lstrip("0")), part.lstrip("0")) if part[0] in "0123456789"
        else (1, 0, part)
        for part in _DIGITS_RE.split(name) if part
    )


def memory_file_name(episode_index: int) -> str:
    """``memory_100.jsonl`` for episode 100, as the guide shows."""
    return f"memory_{episode_index}.jsonl"


# A named log's or a state key's name: a plain file-name part, no dots, no slashes.
# \Z, not $: $ also matches before a final newline.
STREAM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
STREAM_NAME_RULE = ("1 to 64 letters, digits, '_' or '-', starting with a letter or digit "
                    "(no dots, no slashes)")
_RESERVED_RE = re.compile(
    r"^(?:memory_.*\.jsonl|log\..*\.jsonl|state\..*\.(?:json|bin))\Z", re.DOTALL)


# An extra file's name: one file name on every backend. 255 bytes is NAME_MAX of the
# common local file systems; UTF-8 because runtime.json (JSON) lists it.
EXTRA_NAME_MAX_BYTES = 255
EXTRA_NAME_RULE = ("a plain file name like 'optimizer.json': at most 255 bytes in UTF-8, "
                   "no slash, backslash, NUL or leading dot")


def extra_name_problem(name: object) -> str | None:
    """What is wrong with ``name`` as an ``extra_files`` name, or None."""
    if not isinstance(name, str):
        return f"is {type(name).__name__}, not a str"
    if "/" in name or "\\" in name:
        return "holds a slash or a backslash (a path, not a file name)"
    if not name or name in {".", ".."} or name.startswith("."):
        return "is empty or starts with a dot"
    if "\x00" in name:
        return "holds a NUL character, which no file name can"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return (f"holds {name[exc.start:exc.end]!r} at index {exc.start}, a lone surrogate "
                "that UTF-8 cannot encode (it usually comes from bytes decoded with "
                "errors='surrogateescape')")
    if size > EXTRA_NAME_MAX_BYTES:
        return f"is {size} bytes long in UTF-8, more than a file name can be (255)"
    if is_reserved_name(name):
        return "is reserved by ckptwriter (a file it writes itself)"
    return None


def log_file_name(name: str) -> str:
    """``log.messages.jsonl`` for the named log ``messages``."""
    return f"log.{name}.jsonl"


def state_file_name(key: str, kind: str) -> str:
    """``state.skills.json`` (JSON kinds) or ``state.policy.bin`` (bytes) for a state key."""
    return f"state.{key}.{'bin' if kind == 'bytes' else 'json'}"


def is_reserved_name(name: str) -> bool:
    """True for a file name ckptwriter writes itself (manifests, memory, logs, state)."""
    return name in (RUNTIME_JSON, AGENT_JSON) or _RESERVED_RE.match(name) is not None


def temp_name(name: str) -> str:
    """A unique temp directory name for a checkpoint being written."""
    return f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"


def trash_name(name: str) -> str:
    """A unique name a checkpoint is renamed to before it is deleted."""
    return f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}"


def replaced_name(name: str) -> str:
    """A unique name a checkpoint is moved to while it is being replaced."""
    return f"{REPLACED_PREFIX}{name}-{secrets.token_hex(4)}"


def is_leftover(name: str) -> bool:
    """True for temp, trash and replaced entries a crashed writer may leave behind."""
    return name.startswith((TMP_PREFIX, TRASH_PREFIX, REPLACED_PREFIX))


# Never world-writable, whatever the umask: the umask still narrows it further.
DIR_MODE = 0o775


def make_dirs(path: Path) -> None:
    """``mkdir -p`` with :data:`DIR_MODE` at every level.

    ``Path.mkdir(parents=True)`` creates missing parents with ``0o777 & ~umask``, which
    is world-writable under umask 000.

    Raises:
        FileExistsError: ``path`` (or a parent) exists and is not a directory.
        OSError: a directory cannot be created.
    """
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        if p == p.parent:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise
    if not path.is_dir():
        raise FileExistsError(17, "not a directory", str(path))


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def create_run_dir(output_dir: str | os.PathLike[str], run_name: str,
                   now: datetime | None = None) -> Path:
    """Create ``<output_dir>/<run_name>/<YYYYmmdd_HHMMSS>/``, the newest run there.

    Runs are ordered by their names (:func:`run_sort_key`): ``resume_from:
    outputs/<run_name>`` takes the last one. So a new name must sort after every run
    already there, whatever the clock does. The stamp is UTC (the end of daylight saving
    time repeats an hour of local time, never of UTC); and when the clock says a time
    before the newest run's (an NTP step back, a run named by local time before UTC
    stamps, a clock that was ahead), the run is named after that newest run with the
    next ``_N``. Two runs that start in the same second get ``..._HHMMSS`` and
    ``..._HHMMSS_1``; ``mkdir`` without ``exist_ok`` makes the choice race-free across
    processes.

    Args:
        now: the start time (default: the clock); a naive one is taken as UTC.
    """
    when = now or _utc_now()
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc)
    stamp, first = when.strftime("%Y%m%d_%H%M%S"), 0
    parent = Path(output_dir) / run_name
    make_dirs(parent)
    runs = [name for name in os.listdir(parent) if RUN_DIR_RE.match(name)]
    if runs:
        newest = max(runs, key=run_sort_key)
        if run_sort_key(newest) >= run_sort_key(stamp):
            # "<YYYYmmdd_HHMMSS>" is 15 characters; "_N" may follow.
            stamp, first = newest[:15], int(newest[16:] or 0) + 1
    for n in range(first, first + 10_000):
        candidate = parent / (stamp if n == 0 else f"{stamp}_{n}")
        try:
            candidate.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a fresh run directory under {parent}")


def path_text(path: str) -> str:
    """A path as text any JSON can hold: itself, or its ``file:`` URI if not UTF-8.

    A POSIX name is any bytes; JSON text is UTF-8. The URI's percent-escapes keep every
    byte (``urllib.parse.unquote_to_bytes`` gives them back), where a replacement
    character would lose them.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return Path(os.path.abspath(path)).as_uri()
    return path
