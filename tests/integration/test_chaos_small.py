"""The chaos run, small enough for CI: every fault of the nemesis once; nothing lost, duplicated, mismatched or
stuck, and every planned fault really applied."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"
RUNS = {
    "faults": ["--jobs", "60", "--workers", "2", "--repeat", "1", "--s3-outage", "3", "--steps", "40"],
    "ha": ["--ha", "--jobs", "40", "--workers", "2", "--repeat", "2", "--steps", "8"],
}


TESTS = {"faults": "test_small_chaos_run_with_every_fault_loses_and_duplicates_nothing",
         "ha": "test_small_ha_chaos_run_kills_the_primary_twice_and_loses_no_acknowledged_job"}


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[dict[str, tuple[subprocess.Popen[bytes], Path]]]:
    """The selected runs start together, each with its own services and workers: they spend most of their time
    waiting on faults, leases and failovers, so together they take little more than the longer one alone."""
    folder = tmp_path_factory.mktemp("chaos")
    selected = {item.name for item in request.session.items}
    started = {}
    for name, args in RUNS.items():
        if TESTS[name] not in selected:
            continue
        out = folder / f"{name}.out"
        with out.open("wb") as stdout, (folder / f"{name}.err").open("wb") as stderr:
            started[name] = (subprocess.Popen([sys.executable, str(BENCH), *args, "--timeout", "500", "--json"],
                                              stdout=stdout, stderr=stderr), out)
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def finished(runs: dict[str, tuple[subprocess.Popen[bytes], Path]], name: str) -> tuple[dict[str, Any], int, str]:
    """The run's JSON report (its last line), exit status and the end of its stderr."""
    process, out = runs[name]
    returncode = process.wait(timeout=900)
    stderr = out.with_suffix(".err").read_text(errors="replace")[-3000:]
    stdout = out.read_text().strip()
    assert stdout, stderr
    return json.loads(stdout.splitlines()[-1]), returncode, stderr


def test_small_chaos_run_with_every_fault_loses_and_duplicates_nothing(runs: Any) -> None:
    report, returncode, stderr = finished(runs, "faults")
    assert report["lost"] == report["duplicate"] == report["mismatched"] == report["stuck"] == 0, report
    assert not report["faults_missed"], (report, stderr)
    assert set(report["faults_applied"]) == {"kill", "pause", "redis-pause", "redis-kill", "s3-outage", "drop",
                                             "duplicate", "resubmit"}
    assert report["succeeded"] + report["failed"] + report["cancelled"] == report["jobs"] == 60
    assert report["succeeded"] >= 54, report  # a few may exhaust retries during an outage; none is lost
    assert returncode == 0, stderr


def test_small_ha_chaos_run_kills_the_primary_twice_and_loses_no_acknowledged_job(runs: Any) -> None:
    report, returncode, stderr = finished(runs, "ha")
    assert report["faults_applied"] == {"primary-kill": 2} and not report["faults_missed"], report
    assert report["lost"] == report["duplicate"] == report["mismatched"] == report["stuck"] == 0, report
    assert report["hung"] == 0 and len(report["failover_s"]) == 2, report
    assert report["jobs"] == 40 + report["submitted_during"] == report["succeeded"], report  # every acknowledged one
    assert returncode == 0, stderr
