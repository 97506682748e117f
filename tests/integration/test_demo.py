"""``make demo`` end to end (``run_demo``): its own services, a worker serving the SD model and the tiny SDXL
model, one job per strength plus one SDXL job, a contact sheet with every output; nothing left running."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from darkroom.dev.demo import SDXL_MODEL_ID, run_demo
from darkroom.dev.embedded import EmbeddedServices

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_demo_runs_an_sdxl_job_beside_the_sd_jobs(tiny_model: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # When the demo runs (the random tiny SD model stands in for the trained one: no training here)
    code = run_demo(state_dir=tmp_path, model_dir=tiny_model, strengths=[0.3, 0.8], prompt="red")
    out = capsys.readouterr().out
    # Then it succeeded, the SDXL job ran on an sdxl-family model and its output is reported with timings
    assert code == 0, out
    assert re.search(rf"  {SDXL_MODEL_ID} \(family sdxl, strength 0\.60\): s3://darkroom/\S+/000\.png  "
                     r"\(\d+\.\d\d s inference, \d+\.\d\d s on the worker, seed 1234\)", out), out
    assert "random weights (never trained)" in out
    # And the contact sheet holds the input, the two SD outputs and the SDXL output (256 px tiles, 8 px apart)
    sheet = Image.open(next((tmp_path / "demo").glob("contact-sheet-*.png")))
    assert sheet.width == 8 + 4 * (256 + 8)
    # And the SDXL model is cached for the next run, and the services the demo started are stopped
    assert (tmp_path / "models" / "demo-sdxl" / "model_index.json").is_file()
    assert not any(part.get("running") for part in EmbeddedServices(tmp_path).status().values()
                   if isinstance(part, dict))


def test_the_demo_without_families_runs_only_the_sd_jobs(tiny_model: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = run_demo(state_dir=tmp_path, model_dir=tiny_model, strengths=[0.5], prompt="red", families=False)
    out = capsys.readouterr().out
    assert code == 0, out
    assert SDXL_MODEL_ID not in out and not (tmp_path / "models" / "demo-sdxl").exists()
