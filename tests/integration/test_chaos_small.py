"""The chaos run, small enough for CI: kills, a Redis restart and an S3 outage; nothing lost or duplicated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


def test_small_chaos_run_loses_and_duplicates_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--jobs", "40", "--workers", "2", "--kills", "3", "--s3-outage", "4",
         "--steps", "4", "--timeout", "400", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lost"] == 0 and report["duplicate_outputs"] == 0, report
    assert report["succeeded"] + report["failed"] == report["jobs"] == 40
    assert report["kills"] >= 1
    assert report["succeeded"] >= 36, report  # a few may exhaust retries during the outage; none is lost
