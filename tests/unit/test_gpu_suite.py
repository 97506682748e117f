"""bench/gpu_suite.py --dry-run: the GPU suite's code path on the tiny model and the CPU.

The suite runs as a subprocess, as it will on a GPU machine; these tests read its JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.py"


def run_suite(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert out.is_file(), proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


def test_dry_run_runs_every_section_with_positive_figures(tmp_path: Path) -> None:
    proc, report = run_suite(tmp_path, "--workdir", str(tmp_path / "work"))
    sections = report["sections"]
    failed = {name: record.get("error") or record.get("reason") for name, record in sections.items()
              if record["status"] != "ok"}
    assert not failed, f"{failed}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["finished"] is True and report["dry_run"] is True
    assert set(sections) == {"environment", "build", "bare_eager", "bare_compiled", "darkroom_eager",
                             "darkroom_compiled", "mixed_lora", "lora_switch", "attention", "offload", "memory_budget",
                             "load_beside"}
    for name, record in sections.items():
        assert record["seconds"] > 0, name
        assert record["peak_memory_bytes"] > 0, name
    r = {name: record["results"] for name, record in sections.items()}
    b = report["config"]["batch"]
    assert r["environment"]["auto_dtype"] == "float32" and r["environment"]["fp16_on_cpu"].startswith("refused")
    positive = {
        "bare_eager": [r["bare_eager"]["b1"]["it_per_s"], r["bare_eager"][f"b{b}"]["images_per_s"]],
        "bare_compiled": [r["bare_compiled"]["b1"]["it_per_s"], r["bare_compiled"][f"b{b}"]["images_per_s"]],
        "darkroom_eager": [r["darkroom_eager"]["c"]["images_per_s"], r["darkroom_eager"]["d"]["images_per_s"],
                           r["darkroom_eager"]["c/bare_b1"], r["darkroom_eager"][f"d/bare_b{b}"]],
        "darkroom_compiled": [r["darkroom_compiled"]["c"]["images_per_s"], r["darkroom_compiled"]["d"]["it_per_s"],
                              r["darkroom_compiled"]["c/bare_b1"], r["darkroom_compiled"][f"d/bare_b{b}"]],
        "mixed_lora": [r["mixed_lora"]["mixed"]["images_per_s"], r["mixed_lora"]["mixed/darkroom_d"]],
        "lora_switch": [r["lora_switch"]["first_load_ms_median"], r["lora_switch"]["switch_ms_median"]],
        "attention": [r["attention"]["sdpa"]["it_per_s"], r["attention"]["slicing"]["it_per_s"]],
        "offload": [r["offload"]["model"]["it_per_s"]],
        "memory_budget": [r["memory_budget"]["load_a_s"], r["memory_budget"]["load_b_evicting_a_s"],
                          r["memory_budget"]["reload_a_s"]],
    }
    for name, values in positive.items():
        assert all(v > 0 for v in values), (name, values)
    assert r["darkroom_eager"]["d"]["mean_call_jobs"] > 1  # batching on really batched
    assert r["darkroom_eager"]["c"]["mean_call_jobs"] == 1
    assert r["mixed_lora"]["mixed"]["routing"].get("mixed", 0) > 0 and r["mixed_lora"]["resident_adapters"] == 10
    assert r["memory_budget"]["evictions"] >= 2
    assert r["memory_budget"]["resident_bytes"] <= r["memory_budget"]["budget_bytes"]
    assert r["memory_budget"]["too_large"].startswith("model_too_large")
    # the second model loaded beside the engine while the resident one's jobs ran (their load 0, its own > 0)
    assert r["load_beside"]["twin_job_model_load_s"] > 0 and r["load_beside"]["resident_jobs_model_load_s_max"] == 0
    assert r["load_beside"]["overlap"] > 0 and r["load_beside"]["loads_started"] == 1
    assert "bare_eager" in proc.stdout and "report:" in proc.stdout  # the printed table


def test_a_failing_section_is_recorded_and_the_suite_goes_on(tmp_path: Path) -> None:
    proc, report = run_suite(tmp_path, "--sections", "environment,build,bare_eager", "--inject-failure", "environment,build")
    sections = report["sections"]
    assert sections["environment"]["status"] == "failed"
    assert "failure injected into environment" in sections["environment"]["error"]
    assert "Traceback" in sections["environment"]["traceback"]
    assert sections["build"]["status"] == "failed"
    assert sections["bare_eager"]["status"] == "skipped" and "build" in sections["bare_eager"]["reason"]
    assert report["finished"] is True
    assert proc.returncode == 1


def test_the_time_budget_skips_sections_with_a_reason(tmp_path: Path) -> None:
    proc, report = run_suite(tmp_path, "--budget-s", "0", "--sections", "environment,build")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for record in report["sections"].values():
        assert record["status"] == "skipped" and "budget" in record["reason"]
    assert report["finished"] is True
