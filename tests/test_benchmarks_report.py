"""The suite's report: the Markdown table that docs/PERFORMANCE.md is made from."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import suite


def test_markdown_table_has_a_row_per_figure(tmp_path: Path) -> None:
    """--markdown writes the machine line and one table row per figure."""
    out, md = tmp_path / "r.json", tmp_path / "t.md"
    suite.main(["--size", "tiny", "--only", "encode", "--dir", str(tmp_path),
                "--json", str(out), "--markdown", str(md)])
    rows = [ln for ln in md.read_text().splitlines() if ln.startswith("| 5 |")]
    assert md.read_text().startswith("Machine: ")
    assert len(rows) == len(json.loads(out.read_text())["figures"])
