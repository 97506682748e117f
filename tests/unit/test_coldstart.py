"""Cold start: the worker's start-up stages (darkroom.worker.startup), where torch.compile's caches go
(darkroom.worker.compile_cache) and bench/coldstart.py's command line and import report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from darkroom.common.errors import ConfigurationError
from darkroom.worker.compile_cache import (
    CACHE_ENV,
    compile_cache_dir,
    torch_default_cache_dir,
    use_worker_compile_cache,
)
from darkroom.worker.startup import StartupClock, parse_ready_line, process_started_at

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "coldstart.py"


# -- start-up stages ------------------------------------------------------------------------------------
def test_process_start_is_read_from_proc(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    # comm may hold spaces and parentheses; starttime is field 22 (clock ticks since boot)
    fields = ["S"] + ["0"] * 18 + [str(250 * os.sysconf("SC_CLK_TCK"))] + ["0"] * 10
    (tmp_path / "42" / "stat").write_text(f"42 (python (x) y) {' '.join(fields)}\n")
    (tmp_path / "uptime").write_text("262.50 500.00\n")  # seconds since boot: the process is 12.5 s old
    assert process_started_at(42, proc=str(tmp_path), now=lambda: 1000.0) == pytest.approx(987.5)
    assert process_started_at(43, proc=str(tmp_path)) is None  # no such process: None, not an error


def test_this_process_started_before_now() -> None:
    started = process_started_at()
    assert started is not None
    assert time.time() - 7 * 24 * 3600 < started <= time.time()


def test_clock_names_each_stage_and_the_line_parses_back() -> None:
    now = iter([100.0, 100.4, 102.9, 103.2, 104.7, 104.8]).__next__
    clock = StartupClock(started_at=100.0, now=now)  # the first reading caps the start at "now"
    for stage in ("interpreter", "imports", "services", "models", "consumer"):
        clock.mark(stage)
    assert clock.stages == pytest.approx({"interpreter": 0.4, "imports": 2.5, "services": 0.3, "models": 1.5,
                                          "consumer": 0.1})
    assert clock.elapsed == pytest.approx(4.8)
    line = clock.describe()
    assert line == ("ready 4.80 s after the process started: interpreter 0.40 s, imports 2.50 s, services 0.30 s, "
                    "models 1.50 s, consumer 0.10 s")
    text_log = f"2026-12-07 06:32:31,702 INFO w1 job=- darkroom.worker: {line}"
    json_log = json.dumps({"time": "2026-12-07T06:32:31.702+00:00", "level": "INFO", "message": line})
    for logged in (line, text_log, json_log):
        total, stages = parse_ready_line(logged) or (0.0, {})
        assert total == pytest.approx(4.8)
        assert stages == pytest.approx(clock.stages)
    assert parse_ready_line("celery@w1 ready.") is None


def test_a_start_time_in_the_future_is_capped() -> None:
    clock = StartupClock(started_at=200.0, now=iter([150.0, 151.0]).__next__)
    clock.mark("interpreter")
    assert clock.stages == {"interpreter": 1.0}


# -- torch.compile's cache folder -----------------------------------------------------------------------
def test_the_cache_goes_under_the_state_folder_by_default(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    assert compile_cache_dir(tmp_path, env, torch_default=Path("/tmp/torchinductor_x")) == (
        tmp_path / "cache" / "torch-compile", False)
    # torch writes its own default into the environment once it resolves the folder: not the operator's choice
    env[CACHE_ENV] = "/tmp/torchinductor_x"
    assert compile_cache_dir(tmp_path, env, torch_default=Path("/tmp/torchinductor_x")) == (
        tmp_path / "cache" / "torch-compile", False)


def test_an_operators_folder_wins(tmp_path: Path) -> None:
    env = {CACHE_ENV: str(tmp_path / "shared")}
    assert compile_cache_dir(tmp_path / "state", env, torch_default=Path("/tmp/torchinductor_x")) == (
        tmp_path / "shared", True)


def test_use_sets_the_environment_and_creates_the_folder(tmp_path: Path) -> None:
    env = {CACHE_ENV: "/tmp/torchinductor_x"}
    folder = use_worker_compile_cache(tmp_path, True, env, torch_default=Path("/tmp/torchinductor_x"))
    assert folder == tmp_path / "cache" / "torch-compile"
    assert folder.is_dir() and env[CACHE_ENV] == str(folder)


def test_a_worker_that_does_not_compile_changes_nothing(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    assert use_worker_compile_cache(tmp_path, False, env) is None
    assert env == {} and not (tmp_path / "cache").exists()


def test_a_folder_that_cannot_be_made_stops_the_worker_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    env = {CACHE_ENV: str(tmp_path / "file" / "cache")}
    with pytest.raises(ConfigurationError) as caught:
        use_worker_compile_cache(tmp_path, True, env, torch_default=Path("/tmp/torchinductor_x"))
    assert str(tmp_path / "file" / "cache") in str(caught.value) and CACHE_ENV in str(caught.value)


def test_torch_default_is_the_folder_torch_itself_picks(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
    out = subprocess.run([sys.executable, "-c", "from torch._inductor.runtime.cache_dir_utils import cache_dir; "
                                                "print(cache_dir())"], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    assert Path(out.stdout.strip()) == torch_default_cache_dir()


# -- bench/coldstart.py ---------------------------------------------------------------------------------
def _bench_module() -> ModuleType:
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec = importlib.util.spec_from_file_location("coldstart_bench", BENCH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH.parent))


def test_bench_help_explains_variants_and_stages() -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, check=True,
                         timeout=300)
    for word in ("compile-warm", "compile-cold", "interpreter", "first call", "remainder", "--rounds",
                 "--baseline-tree", "--imports", "load average"):
        assert word in out.stdout, word


def test_bench_refuses_unknown_variants_and_a_baseline_without_a_tree() -> None:
    for args, expected in ((["--variants", "eager,fast"], "unknown fast"), (["--variants", "baseline"], "--baseline-tree"),
                           (["--variants", "baseline-compile-warm"], "--baseline-tree"), (["--rounds", "0"], "at least 1")):
        out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and expected in out.stderr, out.stderr


def test_bench_sums_import_time_by_package() -> None:
    bench = _bench_module()
    text = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:      1000 |       1000 |     torch._C",
        "import time:      2000 |       3000 |   torch",
        "import time:       500 |        500 |     scipy.stats",
        "import time:       250 |       3750 | diffusers",
        "2026-12-07 INFO some log line",
    ])
    rows = bench.import_rows(text, top=2, measured_imports=1.5)
    assert rows[0][0].startswith("imports") and "4 modules" in rows[0][1] and "1.50 s" in rows[0][1]
    assert [name.strip() for name, _ in rows[1:]] == ["torch", "scipy"]
    assert "0.00 s" in rows[1][1] and "2 modules" in rows[1][1]


def test_bench_keeps_each_trees_compile_cache_apart() -> None:
    bench = _bench_module()
    assert bench.state_folder("compile-warm", 1) == bench.state_folder("compile-cold", 1) == "state-compile-1"
    assert bench.state_folder("baseline-compile-warm", 1) == bench.state_folder("baseline-compile-cold", 1)
    assert bench.state_folder("baseline-compile-warm", 1) != "state-compile-1"
    assert bench.state_folder("eager", 0) != bench.state_folder("baseline", 0)
    assert bench.is_baseline("baseline-compile-cold") and not bench.is_baseline("compile-warm")


def test_bench_divides_each_compiled_start_by_the_baselines_round_by_round() -> None:
    bench = _bench_module()
    runs = {"compile-warm": [{"wall": 10.0, "cpu": 9.0}, {"wall": 12.0, "cpu": 8.0}],
            "baseline-compile-warm": [{"wall": 20.0, "cpu": 12.0}, {"wall": 16.0, "cpu": 16.0}]}
    assert bench.after_before(runs) == [("compile-warm / baseline-compile-warm (time)", "0.62 (0.50-0.75)"),
                                        ("compile-warm / baseline-compile-warm (CPU time)", "0.62 (0.50-0.75)")]
    assert bench.after_before({"compile-warm": runs["compile-warm"]}) == []
