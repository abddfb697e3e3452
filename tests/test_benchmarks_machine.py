"""What the suite records about the machine it ran on."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.machine import filesystem_of


def test_filesystem_of_finds_the_mount(tmp_path: Path) -> None:
    """The filesystem type comes from the longest mount point holding the path."""
    fs = filesystem_of(tmp_path)
    mounts = Path("/proc/mounts").read_text().split("\n")
    assert any(line.split()[1:3] == [fs["mount_point"], fs["fs_type"]]
               for line in mounts if line)
    assert os.path.realpath(tmp_path).startswith(fs["mount_point"])
