"""Named logs and agent state round-trip on S3 (moto) too: see test_logs.round_trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from _s3_util import s3_endpoint  # noqa: F401
from test_logs import round_trip

pytestmark = [pytest.mark.anyio, pytest.mark.s3]


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_every_kind_round_trips_on_s3(executor: str, tmp_path: Path,
                                            request: pytest.FixtureRequest) -> None:
    await round_trip(executor, "s3", tmp_path, request)
