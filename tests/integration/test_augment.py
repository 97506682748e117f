"""Bulk augmentation on real services: a run killed midway and resumed makes each grid cell exactly once,
failed cells are reported and resubmitted, and the exported dataset loads with the ``datasets`` library."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from darkroom.common.augment_keys import AUGMENT_RUNS_KEY, augment_run_key
from darkroom.common.cli import main
from darkroom.common.errors import InvalidJobError
from darkroom.common.jobstore import cancel_key, job_key
from darkroom.common.lifecycle import Lifecycle
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.common.storage import S3Uri
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.augment import Augmentation, AugmentSpec, SpecConflict, read_metadata
from darkroom.producer.augment.sheet import contact_sheet
from darkroom.producer.client import Client

from ..conftest import png_bytes
from .conftest import spawn_worker

pytestmark = pytest.mark.integration

DARKROOM = str(Path(sys.executable).with_name("darkroom"))
MODEL = "tiny-augment"  # served by this module's worker only (no safety checker: the fastest jobs)
QUICK = ["--set", "num_inference_steps=2", "--set", "guidance_scale=1.0"]  # one denoising step, no CFG


@pytest.fixture(scope="module")
def quick_worker(services: object, settings: Settings, tiny_model: Path) -> Iterator[WorkerProcess]:
    """A worker serving the tiny model without a safety checker (the fastest jobs the worker can run)."""
    process = spawn_worker(services, settings, f"augment-{uuid.uuid4().hex[:6]}", "--model", f"{MODEL}={tiny_model}",
                           DARKROOM_SAFETY_CHECKER="none").start(timeout=120)
    try:
        yield process
    finally:
        process.stop()


def source_images(count: int) -> list[Image.Image]:
    """``count`` different 64x64 pictures (the demo's lighthouse, rotated and posterized)."""
    base = sample_image(64)
    return [ImageOps.posterize(base.rotate(90 * (i % 4)), 1 + i % 8) for i in range(count)]


def cli_env(services: object, settings: Settings) -> dict[str, str]:
    return {**os.environ, **services.as_env(), "DARKROOM_STATE_DIR": str(settings.state_dir)}  # type: ignore[attr-defined]


def keys_under(client: Client, prefix: str) -> list[str]:
    root = S3Uri.parse(prefix)
    return [o.uri.key[len(root.key) + 1:] for o in client.store.list_objects(S3Uri(root.bucket, root.key + "/"))]


def test_a_run_killed_midway_and_resumed_makes_every_cell_exactly_once(
    quick_worker: WorkerProcess, services: object, settings: Settings, client: Client, tmp_path: Path,
) -> None:
    # Given 10 local pictures and a grid of 2 prompts × 2 strengths × 5 seeds: 200 jobs
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(source_images(10)):
        image.save(folder / f"photo-{i:02d}.png")
    output = f"s3://darkroom/augment-{uuid.uuid4().hex[:8]}"
    command = [DARKROOM, "augment", "--model", MODEL, "--source", str(folder), "--output", output,
               "--prompt", "{stem}, watercolor", "--prompt", "{stem} at night", "--strength", "0.5,0.75",
               "--seed", "0-4", "--window", "16", *QUICK]
    env = cli_env(services, settings)
    spec = AugmentSpec.build({"model": MODEL, "sources": str(folder), "output_prefix": output,
                              "prompts": ["{stem}, watercolor", "{stem} at night"], "strengths": [0.5, 0.75],
                              "seeds": [0, 1, 2, 3, 4], "fields": {"num_inference_steps": 2, "guidance_scale": 1.0}})
    board = augment_run_key(spec.run_id)

    # When the run is interrupted (Ctrl-C) once some jobs have succeeded
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while int(client.jobs.redis.hget(board, "done") or 0) < 30:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run made no progress"
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 130, (out, err)
    assert "resume with the same command" in err and f"--resume {output}" in err
    stopped_at = int(client.jobs.redis.hget(board, "done") or 0)
    assert 30 <= stopped_at < 200
    assert client.jobs.redis.hget(board, "state") == b"stopped"

    # And then the same command runs again, exporting the dataset
    export = tmp_path / "dataset"
    second = subprocess.run([*command, "--export", str(export)], env=env, capture_output=True, text=True, timeout=300)

    # Then it finished, resuming rather than starting over
    assert second.returncode == 0, (second.stdout, second.stderr)
    assert "finished: 200 images, 0 failed" in second.stdout
    done_before = int(second.stdout.split("  done ")[1].split(" ")[0])
    assert done_before >= stopped_at

    # And every grid cell has exactly one output and one committed result, and no job ran twice
    cells = Augmentation(client, spec).cells
    assert len(cells) == 200 and len({c.job_id for c in cells}) == 200
    keys = keys_under(client, output)
    images = Counter(k.split("/")[0] for k in keys if k.endswith("/000.png") and not k.startswith("_augment/"))
    results = Counter(k.split("/")[0] for k in keys if k.endswith("/result.json"))
    assert set(images) == set(results) == {c.job_id for c in cells}
    assert set(images.values()) == set(results.values()) == {1}
    assert not [k for k in keys if k.endswith("/001.png")]
    for cell in cells:
        history = client.jobs.history(cell.job_id)
        assert [e["event"] for e in history].count("started") == 1, (cell.job_id, history)
        assert client.status(cell.job_id).status is JobStatus.SUCCEEDED

    # And the manifest has one row per output image, with the parameters, in JSONL and Parquet
    manifest = [json.loads(line) for line in client.download(f"{output}/manifest.jsonl").decode().splitlines()]
    assert len(manifest) == 200 and {r["status"] for r in manifest} == {"succeeded"}
    assert {r["job_id"] for r in manifest} == {c.job_id for c in cells}
    row = manifest[0]
    assert row["source_uri"] == f"{output}/_augment/inputs/photo-00.png" and row["prompt"] == "photo-00, watercolor"
    published = client.status(row["job_id"]).result
    assert published is not None and row["output_uri"] == published.outputs[0].uri
    assert row["output_uri"].startswith(f"{output}/{row['job_id']}/") and row["output_uri"].endswith("/000.png")
    assert row["strength"] == 0.5 and row["seed"] == 0
    assert row["num_inference_steps"] == 2 and row["safety_action"] == "none" and row["nsfw"] is None
    import pyarrow.parquet as pq

    table = pq.read_table(__import__("io").BytesIO(client.download(f"{output}/manifest.parquet")))
    assert table.num_rows == 200 and {"source_uri", "output_uri", "prompt", "strength", "seed"} <= set(table.column_names)
    assert client.download(f"{output}/failures.jsonl") == b""

    # And the exported folder loads as an imagefolder dataset with the right rows
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(export), split="train")
    assert loaded.num_rows == 200
    assert {"image", "prompt", "strength", "seed", "source_uri"} <= set(loaded.column_names)
    assert loaded[0]["image"].size == (64, 64)
    assert Counter(loaded["strength"]) == {0.5: 100, 0.75: 100}

    # And the dashboard record says the run finished
    state = {k.decode(): v.decode() for k, v in client.jobs.redis.hgetall(board).items()}
    assert state["state"] == "finished" and state["done"] == "200" and state["in_flight"] == "0"
    assert state["total"] == "200" and state["output_prefix"] == output
    assert client.jobs.redis.zscore(AUGMENT_RUNS_KEY, spec.run_id) == pytest.approx(float(state["started_at"]))


def test_failed_cells_are_reported_and_resubmitted_on_the_next_run(
    quick_worker: WorkerProcess, services: object, settings: Settings, client: Client, tmp_path: Path,
) -> None:
    # Given an S3 prefix with two pictures and one file that is not an image
    sources = f"s3://darkroom/augment-src-{uuid.uuid4().hex[:8]}"
    for i, image in enumerate(source_images(2)):
        client.upload(png_bytes(image), f"{sources}/ok-{i}.png")
    client.upload(b"not an image at all", f"{sources}/broken.png")
    spec = AugmentSpec.build({"model": MODEL, "sources": sources + "/", "output_prefix": sources + "-out",
                              "prompts": ["a boat"], "strengths": [0.5], "seeds": [3],
                              "fields": {"num_inference_steps": 2}})

    # When the run goes through
    first = Augmentation(client, spec).run(window=4)

    # Then the broken source's cell failed with its code, in the report and the failure file
    assert first.finished and first.progress.done == 2 and first.progress.failed == 1
    assert first.dataset is not None and first.dataset.images == 2 and first.dataset.failed == 1
    failures = [json.loads(line) for line in client.download(first.dataset.failures).decode().splitlines()]
    assert [(f["source_name"], f["status"], f["error_code"]) for f in failures] == \
        [("broken.png", "failed", "input_unreadable")]

    # And a dry run of the same spec says so, without changing anything
    dry = CliRunner().invoke(main, ["augment", "--resume", spec.output_prefix, "--dry-run"],
                             env=cli_env(services, settings))
    assert dry.exit_code == 0, dry.output
    assert "3 jobs" in dry.output and "done 2 · failed or cancelled 1 (resubmitted)" in dry.output
    assert "to submit: 1" in dry.output and "dry run: nothing was uploaded" in dry.output

    # When it runs again, only the failed cell is submitted again (replacing its record), and fails again
    second = Augmentation(client, spec).run(window=4)
    assert second.finished and second.progress.submitted == 1 and second.progress.failed == 1
    broken = next(c for c in Augmentation(client, spec).cells if c.source.name == "broken.png")
    history = client.jobs.history(broken.job_id)
    assert history[0]["event"] == "resubmitted" and history[0]["previous_error_code"] == "input_unreadable"
    assert [e["event"] for e in history].count("started") == 1
    assert client.jobs.redis.exists(job_key(broken.job_id) + ":history:previous")

    # And another spec is refused at that prefix, unless it replaces the saved one (reusing the finished cells)
    grown = AugmentSpec.build({**spec.model_dump(mode="json"), "seeds": [3, 4]})
    with pytest.raises(SpecConflict, match="holds run .* of another spec"):
        Augmentation(client, grown).run(window=4, retry_failed=False)
    third = Augmentation(client, grown).run(window=4, retry_failed=False, update_spec=True)
    assert third.finished and third.progress.submitted == 3 and (third.progress.done, third.progress.failed) == (4, 2)

    # And the export draws a contact sheet: one row per source, the source then its outputs
    export = tmp_path / "dataset"
    assert Augmentation(client, grown).export(export) == 4
    sheet = contact_sheet(read_metadata(grown.output_prefix, client.store), export, client.store,
                          tmp_path / "sheet.png", tile=32)
    assert Image.open(sheet).size == (4 + 3 * 36, 2 * (32 + 14 + 4) + 4)


def test_resubmit_replaces_only_a_failed_or_cancelled_job(client: Client) -> None:
    client.fleet.register_models(["unserved"])  # no worker takes its jobs: they stay as the test sets them
    job = {"model": "unserved", "image": "s3://darkroom/inputs/none.png", "prompt": "x",
           "job_id": f"re-{uuid.uuid4().hex}"}
    client.submit(job)

    # A queued job is neither refused silently nor replaced
    with pytest.raises(InvalidJobError, match="did not fail or get cancelled"):
        client.submit(job, resubmit=True)

    # A cancelled one is replaced atomically: queued again, cancel flag gone, history kept aside
    life = Lifecycle(client.jobs.redis)
    client.cancel(job["job_id"])
    life.note(job["job_id"], "started", attempt=1)
    assert client.jobs.is_cancelled(job["job_id"])
    client.submit(job, resubmit=True)
    record = client.status(job["job_id"])
    assert record.status is JobStatus.QUEUED and record.attempt == 0
    assert not client.jobs.redis.exists(cancel_key(job["job_id"]))
    assert [e["event"] for e in client.jobs.history(job["job_id"])] == ["resubmitted"]
    previous = client.jobs.redis.lrange(job_key(job["job_id"]) + ":history:previous", 0, -1)
    assert [json.loads(e)["event"] for e in previous] == ["cancelled", "started"]

    # A failed one too; a plain submit still refuses the id
    started = life.start(job["job_id"], None, worker="t", lease_seconds=60, max_lost=5)
    assert started.fence is not None and started.record is not None
    life.fail(started.fence, started.record, "internal_error", "boom")
    with pytest.raises(InvalidJobError, match="already exists"):
        client.submit(job)
    handles = client.submit_many([job], resubmit=True)
    assert handles[0].status().status is JobStatus.QUEUED

    # A succeeded job is never replaced
    client.jobs.redis.set(job_key(job["job_id"]), client.status(job["job_id"]).model_copy(
        update={"status": JobStatus.SUCCEEDED}).model_dump_json())
    with pytest.raises(InvalidJobError):
        client.submit(job, resubmit=True)
