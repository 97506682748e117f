"""The chaos run, small enough for CI: every fault of the nemesis once; nothing lost, duplicated, mismatched or
stuck, and every planned fault really applied."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


def test_small_chaos_run_with_every_fault_loses_and_duplicates_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--jobs", "60", "--workers", "2", "--repeat", "1", "--s3-outage", "3",
         "--steps", "40", "--timeout", "500", "--json"],
        capture_output=True, text=True, timeout=700,
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lost"] == report["duplicate"] == report["mismatched"] == report["stuck"] == 0, report
    assert not report["faults_missed"], (report, result.stderr[-3000:])
    assert set(report["faults_applied"]) == {"kill", "pause", "redis-pause", "redis-kill", "s3-outage", "drop",
                                             "duplicate", "resubmit"}
    assert report["succeeded"] + report["failed"] + report["cancelled"] == report["jobs"] == 60
    assert report["succeeded"] >= 54, report  # a few may exhaust retries during an outage; none is lost
    assert result.returncode == 0, result.stderr[-3000:]


def test_small_ha_chaos_run_kills_the_primary_twice_and_loses_no_acknowledged_job() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--ha", "--jobs", "40", "--workers", "2", "--repeat", "2", "--steps", "8",
         "--timeout", "500", "--json"],
        capture_output=True, text=True, timeout=700,
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["faults_applied"] == {"primary-kill": 2} and not report["faults_missed"], report
    assert report["lost"] == report["duplicate"] == report["mismatched"] == report["stuck"] == 0, report
    assert report["hung"] == 0 and len(report["failover_s"]) == 2, report
    assert report["jobs"] == 40 + report["submitted_during"] == report["succeeded"], report  # every acknowledged one
    assert result.returncode == 0, result.stderr[-3000:]
