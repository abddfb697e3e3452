"""A reader of a live run in its own process, and the test side that starts and tallies it.

``python _live_reader.py LOCATION`` loads ``LOCATION`` (a ``.../latest``) with
:func:`ckptwriter.load_checkpoint` in a loop until its stdin closes, and prints one JSON
line per load: ``{"ep": N, "entries": M}``, ``{"error": "..."}`` or ``{"warning": "..."}``
(a :class:`~ckptwriter.CheckpointFallbackWarning` or any other warning a load raised).
It keeps reading after an error, so a test sees every bad load, not only the first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

PY = sys.executable
HERE = Path(__file__).resolve()
# Seconds a reader may take to notice its stdin closed and finish its current load (a
# load of a large checkpoint on a busy machine): a hang, not slowness, if exceeded.
_STOP_TIMEOUT = 120


@dataclass
class Tally:
    """What a reader process saw."""

    episodes: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lines: int = 0

    @property
    def loads(self) -> int:
        """Loads that returned a checkpoint."""
        return len(self.episodes)

    @property
    def distinct(self) -> int:
        """Checkpoints (episodes) loaded: how often the reader saw ``latest`` move, plus one."""
        return len(set(self.episodes))


class LiveReader:
    """A reader process polling ``location``; :meth:`stop` ends it and returns its tally."""

    def __init__(self, location: str) -> None:
        self.tally = Tally()
        self._lock = threading.Lock()
        # A file, not a pipe: nobody reads stderr until the end, so a pipe could fill.
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([PY, str(HERE), location], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True)
        self._thread = threading.Thread(target=self._consume, name="live-reader-out")
        self._thread.start()

    def _consume(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            rec = json.loads(line)
            with self._lock:
                t = self.tally
                t.lines += 1
                if "ep" in rec:
                    t.episodes.append(int(rec["ep"]))
                elif "error" in rec:
                    t.errors.append(str(rec["error"]))
                else:
                    t.warnings.append(str(rec["warning"]))

    @property
    def loads(self) -> int:
        """Loads so far (read while the reader runs)."""
        with self._lock:
            return self.tally.loads

    @property
    def distinct(self) -> int:
        """Episodes loaded so far."""
        with self._lock:
            return self.tally.distinct

    @property
    def failures(self) -> int:
        """Errors and warnings so far."""
        with self._lock:
            return len(self.tally.errors) + len(self.tally.warnings)

    def stop(self) -> Tally:
        """Close the reader's stdin, wait for its last load, and return what it saw."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._err.seek(0)
        err = self._err.read().decode(errors="replace")
        self._err.close()
        assert self.proc.returncode == 0, f"reader process exited {self.proc.returncode}: {err}"
        return self.tally


def _main(location: str) -> None:
    from ckptwriter import load_checkpoint

    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.is_set():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                ck = load_checkpoint(location)
                rec: dict[str, object] = {"ep": ck.runtime.episode_index,
                                          "entries": len(ck.memory)}
            except Exception as exc:
                rec = {"error": f"{type(exc).__name__}: {exc}"}
        for w in seen:
            print(json.dumps({"warning": f"{w.category.__name__}: {w.message}"}), flush=True)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1])
