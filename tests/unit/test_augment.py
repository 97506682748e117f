"""Augmentation without services: spec validation, grid expansion, deterministic ids, manifests, CLI parsing."""

from __future__ import annotations

import hashlib
import io
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darkroom.common.errors import InvalidJobError
from darkroom.common.jobstore import JobRecord
from darkroom.common.results import JobResult, OutputImage, Timings
from darkroom.common.safety import SafetyAction, SafetyVerdict
from darkroom.common.status import JobStatus
from darkroom.producer.augment import AugmentSpec, Source, cell_id, expand, parse_adapter_set, parse_seeds
from darkroom.producer.augment.dataset import _cell_rows, _metadata, _parquet, _uniform
from darkroom.producer.augment.plan import Estimate, Plan
from darkroom.producer.augment.sources import list_sources
from darkroom.producer.augment.submitter import Progress
from darkroom.producer.cli_augment import ProgressBar, spec_fields

ID = re.compile(r"^aug-[0-9a-f]{24}$")


def spec(**changes: Any) -> AugmentSpec:
    return AugmentSpec.build({"model": "tiny", "sources": "s3://bkt/photos/", "output_prefix": "s3://bkt/aug/v1",
                              "prompts": ["{stem}, watercolor", "{stem} at night"], "strengths": [0.4, 0.6],
                              "seeds": [0, 1], **changes})


def sources(count: int = 3, **row: Any) -> list[Source]:
    return [Source(f"s3://bkt/photos/p{i}.png", f"etag{i}", f"p{i}.png", dict(row)) for i in range(count)]


def errors_of(call: Any) -> dict[str, str]:
    with pytest.raises(InvalidJobError) as info:
        call()
    return {e.field: f"{e.message}; {e.allowed}" for e in info.value.errors}


# -- the grid -----------------------------------------------------------------------------------
def test_the_grid_is_every_source_times_every_axis_in_order() -> None:
    cells = expand(spec(), sources(3))
    assert len(cells) == 3 * 2 * 2 * 2
    first = cells[0].params
    assert first == {"model": "tiny", "image": "s3://bkt/photos/p0.png", "prompt": "p0, watercolor",
                     "strength": 0.4, "seed": 0, "adapters": []}
    assert [(c.params["prompt"], c.params["strength"], c.params["seed"]) for c in cells[:4]] == [
        ("p0, watercolor", 0.4, 0), ("p0, watercolor", 0.4, 1), ("p0, watercolor", 0.6, 0), ("p0, watercolor", 0.6, 1)]
    assert cells[-1].params["image"] == "s3://bkt/photos/p2.png" and cells[-1].params["prompt"] == "p2 at night"
    job = cells[0].job(spec())
    assert job["priority"] == "bulk" and job["output_prefix"] == "s3://bkt/aug/v1" and job["job_id"] == cells[0].job_id


def test_vary_fields_and_adapter_sets_are_axes_too() -> None:
    s = spec(prompts=["x"], strengths=[0.5], seeds=[1], vary={"guidance_scale": [5, 7.5]},
             adapters=[[], [{"uri": "ink", "weight": 0.8}]], fields={"num_inference_steps": 30})
    cells = expand(s, sources(1))
    assert [(c.params["guidance_scale"], c.params["adapters"]) for c in cells] == [
        (5, []), (7.5, []), (5, [{"uri": "ink", "weight": 0.8}]), (7.5, [{"uri": "ink", "weight": 0.8}])]
    assert {c.params["num_inference_steps"] for c in cells} == {30}
    assert s.describe() == "2 adapter sets × 2 guidance_scales"


def test_manifest_rows_bring_prompts_and_fields_per_source() -> None:
    s = spec(prompts=[], strengths=[0.5], seeds=[0])
    rows = [Source("s3://bkt/a.png", "e1", "a.png", {"prompt": "a red barn", "guidance_scale": "5", "caption": "barn"}),
            Source("s3://bkt/b.png", "e2", "b.png", {"prompt": "a boat", "caption": "boat"})]
    cells = expand(s, rows)
    assert [(c.params["prompt"], c.params.get("guidance_scale")) for c in cells] == [("a red barn", 5.0),
                                                                                    ("a boat", None)]
    templated = expand(spec(prompts=["{caption}, {prompt}"], strengths=[0.5], seeds=[0]), rows)
    assert [c.params["prompt"] for c in templated] == ["barn, a red barn", "boat, a boat"]


def test_grid_errors_name_the_template_or_row_at_fault() -> None:
    found = errors_of(lambda: expand(spec(prompts=["{caption} in fog"]), sources(1)))
    assert "uses {caption}, which source p0.png lacks" in found["prompts[0]"]
    assert "{name}" in found["prompts[0]"] and "{stem}" in found["prompts[0]"]
    assert "no prompt column" in errors_of(lambda: expand(spec(prompts=[]), sources(1)))["sources[0].prompt"]
    assert "not a plain variable" in errors_of(lambda: expand(spec(prompts=["{stem.upper}"]), sources(1)))["prompts[0]"]
    pinned = errors_of(lambda: expand(spec(), sources(1, strength=0.3)))
    assert "the spec varies strength" in pinned["sources[0].strength"]
    bad_row = errors_of(lambda: expand(spec(strengths=[0.5]), sources(1, guidance_scale=500, job_id="x")))
    assert "decided by the run" in bad_row["sources[0].job_id"]
    same = errors_of(lambda: expand(spec(prompts=["a", "{name}"]), [Source("s3://bkt/a", "e", "a", {})]))
    assert "makes the same job" in same["sources[0]"]


def test_a_row_value_replaces_an_axis_of_one_value() -> None:
    cells = expand(spec(strengths=[0.5]), sources(1, strength="0.25"))
    assert {c.params["strength"] for c in cells} == {0.25}


# -- ids ------------------------------------------------------------------------------------------
def test_ids_depend_on_the_source_identity_and_every_parameter() -> None:
    s = spec()
    cells = expand(s, sources(2))
    again = expand(s, sources(2))
    assert [c.job_id for c in cells] == [c.job_id for c in again]
    assert all(ID.match(c.job_id) for c in cells) and len({c.job_id for c in cells}) == len(cells)
    source, params = cells[0].source, cells[0].params
    changed = Source(source.uri, "another-etag", source.name)
    assert cell_id(changed, s.output_prefix, params) != cells[0].job_id
    assert cell_id(source, "s3://bkt/aug/v2", params) != cells[0].job_id
    assert cell_id(source, s.output_prefix, {**params, "strength": 0.41}) != cells[0].job_id
    assert cell_id(source, s.output_prefix, dict(reversed(params.items()))) == cells[0].job_id


def test_adding_a_seed_keeps_the_ids_of_the_cells_already_there() -> None:
    small = {c.job_id for c in expand(spec(), sources(2))}
    grown = {c.job_id for c in expand(spec(seeds=[0, 1, 2]), sources(2))}
    assert small < grown and len(grown) == len(small) * 3 // 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 1), min_size=1, max_size=4, unique=True),
       st.lists(st.integers(0, 2**40), min_size=1, max_size=4, unique=True), st.integers(1, 4))
def test_every_grid_has_one_cell_per_combination_and_distinct_ids(strengths: list[float], seeds: list[int],
                                                                   count: int) -> None:
    cells = expand(spec(strengths=strengths, seeds=seeds, fields={"num_inference_steps": 1000}), sources(count))
    assert len(cells) == count * 2 * len(strengths) * len(seeds) == len({c.job_id for c in cells})


# -- the spec -------------------------------------------------------------------------------------
def test_spec_errors_name_the_spec_field_item_and_allowed_values() -> None:
    found = errors_of(lambda: spec(strengths=[0.4, 1.5, 0.4], seeds=[-1], vary={"guidance_scale": [5, 200],
                                   "image": ["x"], "colour": [1]}, fields={"num_inference_steps": 0, "seed": 3},
                                   output_prefix="s3://bkt/photos/out"))
    assert found["strengths[1]"].endswith("0.0 <= strength <= 1.0")
    assert "repeats strengths[0]" in found["strengths[2]"]
    assert "0 <= seed" in found["seeds[0]"]
    assert "guidance_scale <= 100.0" in found["vary.guidance_scale[1]"]
    assert "decided by the run" in found["vary.image"] and "not a job field" in found["vary.colour"]
    assert "1 <= num_inference_steps" in found["fields.num_inference_steps"]
    assert "use seeds" in found["fields.seed"]
    assert "lies under sources" in found["output_prefix"]
    assert "Field required" in errors_of(lambda: AugmentSpec.build({"model": "m"}))["sources"]
    assert "unknown field" in errors_of(lambda: spec(strenghts=[0.5]))["strenghts"]
    with pytest.raises(InvalidJobError, match=r"^invalid augmentation spec \(1 error"):
        spec(strengths=[2.0])
    no_step = errors_of(lambda: spec(strengths=[0.5, 0.01], fields={"num_inference_steps": 10}))
    assert list(no_step) == ["strengths[1]"] and "runs no denoising step" in no_step["strengths[1]"]


def test_the_run_id_is_a_hash_of_the_whole_spec() -> None:
    assert spec().run_id == spec().run_id and len(spec().run_id) == 16
    assert spec().run_id != spec(seeds=[0, 1, 2]).run_id


def test_cli_flags_and_a_spec_file_make_one_spec(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    file = tmp_path / "grid.toml"
    file.write_text('model = "tiny"\nsources = "photos"\noutput_prefix = "s3://bkt/aug/v1"\n'
                    'prompts = ["{stem}, ink"]\n[fields]\nnum_inference_steps = 30\n')
    data = spec_fields(spec_file=file, model=None, sources=None, output_prefix=None, prompts=(),
                       strengths=("0.3,0.5", "0.7"), seeds=("0-2,9",), adapters=("none", "ink:0.8+s3://bkt/x.safetensors"),
                       set_fields=("guidance_scale=5",), vary=("clip_skip=1,2",), inputs_prefix=None)
    s = AugmentSpec.build(data)
    assert s.sources == str((tmp_path / "photos").resolve())
    assert s.strengths == [0.3, 0.5, 0.7] and s.seeds == [0, 1, 2, 9]
    assert [[a.model_dump() for a in group] for group in s.adapters] == [
        [], [{"uri": "ink", "weight": 0.8}, {"uri": "s3://bkt/x.safetensors", "weight": 1.0}]]
    assert s.fields == {"num_inference_steps": 30, "guidance_scale": 5} and s.vary == {"clip_skip": [1, 2]}
    assert parse_seeds("3") == [3] and parse_adapter_set("s3://b/y.safetensors:0.5") == [
        {"uri": "s3://b/y.safetensors", "weight": 0.5}]
    with pytest.raises(InvalidJobError, match="not a seed or a range"):
        parse_seeds("1-x")


# -- sources ----------------------------------------------------------------------------------------
def test_local_folders_and_manifests_list_their_images_with_content_identities(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(b"png-a")
    (tmp_path / "sub" / "b.JPG").write_bytes(b"jpg-b")
    (tmp_path / "notes.txt").write_text("not an image")
    found = list_sources(str(tmp_path), "s3://bkt/run/_augment/inputs", store=None)  # type: ignore[arg-type]
    assert [(s.name, s.uri) for s in found] == [("a.png", "s3://bkt/run/_augment/inputs/a.png"),
                                               ("sub/b.JPG", "s3://bkt/run/_augment/inputs/sub/b.JPG")]
    assert found[0].identity == hashlib.md5(b"png-a").hexdigest()  # the ETag a single-part upload gets
    assert found[0].local_path == tmp_path / "a.png"

    (tmp_path / "m.csv").write_text("image,prompt,guidance_scale\na.png,a red barn,5\nsub/b.JPG,a boat,\n")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "prompt": "a red barn", "caption": "x"}\n\n')
    from_csv = list_sources(str(tmp_path / "m.csv"), "s3://bkt/in", store=None)  # type: ignore[arg-type]
    assert [dict(s.row) for s in from_csv] == [{"prompt": "a red barn", "guidance_scale": "5"}, {"prompt": "a boat"}]
    assert from_csv[0].identity == found[0].identity and from_csv[1].uri == "s3://bkt/in/sub/b.JPG"
    from_jsonl = list_sources(str(tmp_path / "m.jsonl"), "s3://bkt/in", store=None)  # type: ignore[arg-type]
    assert from_jsonl[0].variables == {"name": "a.png", "stem": "a", "prompt": "a red barn", "caption": "x"}

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"image": "a.png", "prompt": "p"}]), tmp_path / "m.parquet")
    assert list_sources(str(tmp_path / "m.parquet"), "s3://bkt/in", store=None)[0].row == {"prompt": "p"}  # type: ignore[arg-type]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "no image"}\n')
    assert "missing" in errors_of(lambda: list_sources(str(tmp_path / "bad.jsonl"), "s3://bkt/in", None))["sources[0].image"]  # type: ignore[arg-type]
    (tmp_path / "empty").mkdir()
    assert "holds no images" in errors_of(lambda: list_sources(str(tmp_path / "empty"), "s3://bkt/i", None))["sources"]  # type: ignore[arg-type]
    assert "is not a folder" in errors_of(lambda: list_sources(str(tmp_path / "nope"), "s3://bkt/i", None))["sources"]  # type: ignore[arg-type]


# -- the manifest -------------------------------------------------------------------------------------
def _record(job_id: str, status: JobStatus, result: JobResult | None = None, code: str | None = None) -> JobRecord:
    from darkroom.common.jobs import Img2ImgJob

    now = datetime.now(UTC)
    return JobRecord(job_id=job_id, status=status, job=Img2ImgJob(model="tiny", image="s3://bkt/x.png", prompt="x"),
                     created_at=now, updated_at=now, error_code=code, error_message="boom" if code else None,
                     result=result)


def _result(job_id: str, prefix: str) -> JobResult:
    verdict = SafetyVerdict(checker="opennsfw", version="1", score=0.7, threshold=0.5, flagged=True,
                            action=SafetyAction.BLURRED)
    return JobResult(job_id=job_id, model="tiny", result_uri=f"{prefix}/{job_id}/result.json", parameters={},
                     outputs=[OutputImage(index=0, uri=f"{prefix}/{job_id}/000.png", seed=7, width=64, height=64,
                                          content_type="image/png", nsfw=True, safety=verdict,
                                          quarantine_uri=f"s3://qbkt/{job_id}/000.png")],
                     timings=Timings(total=0.3), worker="w", device="cpu", attempt=1, finished_at=datetime.now(UTC))


def test_manifest_rows_carry_parameters_outputs_safety_and_failures() -> None:
    s = spec(prompts=["{stem}"], strengths=[0.5], seeds=[7])
    ok, bad, never = expand(s, [Source("s3://bkt/photos/a.png", "e", "a.png", {"caption": "barn"}),
                                Source("s3://bkt/photos/b.png", "e", "b.png", {}),
                                Source("s3://bkt/photos/c.png", "e", "c.png", {})])
    rows = _uniform(_cell_rows(s, ok, _record(ok.job_id, JobStatus.SUCCEEDED, _result(ok.job_id, s.output_prefix)), None)
                    + _cell_rows(s, bad, _record(bad.job_id, JobStatus.FAILED, code="input_unreadable"), None)
                    + _cell_rows(s, never, None, None))
    assert [r["status"] for r in rows] == ["succeeded", "failed", "not_run"]
    assert list(rows[0])[:6] == ["job_id", "status", "source_uri", "source_identity", "source_name", "output_uri"]
    assert all(list(r) == list(rows[0]) for r in rows)
    first = rows[0]
    assert first["output_uri"] == f"s3://bkt/aug/v1/{ok.job_id}/000.png" and first["seed"] == 7
    assert (first["nsfw"], first["safety_action"], first["safety_score"]) == (True, "blurred", 0.7)
    assert first["prompt"] == "a" and first["strength"] == 0.5 and first["guidance_scale"] == 7.5
    assert first["adapters"] == "[]" and first["caption"] == "barn" and rows[1]["caption"] is None
    assert (rows[1]["error_code"], rows[1]["output_uri"]) == ("input_unreadable", None)
    metadata = _metadata(s, rows)
    assert [m["file_name"] for m in metadata] == [f"{ok.job_id}/000.png"] and list(metadata[0])[0] == "file_name"

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(_parquet(rows) or b""))
    assert table.num_rows == 3 and table.column_names == list(rows[0])
    assert json.loads(json.dumps(rows)) == rows


# -- progress -------------------------------------------------------------------------------------------
def test_the_progress_line_shows_counts_rate_and_eta() -> None:
    p = Progress(total=200, done=90, failed=2, in_flight=16, waiting=92, submitted=108, elapsed=30.0, rate=4.0)
    line = ProgressBar.line(p)
    assert "92/200" in line and "done 90" in line and "failed 2" in line and "in flight 16" in line
    assert "4.0 jobs/s" in line and "ETA 27 s" in line
    assert ProgressBar.line(Progress(200, 0, 0, 5, 195, 5, 1.0, 0.0)).endswith("ETA ?")


def test_the_estimate_divides_the_remaining_work_among_live_workers() -> None:
    assert "about 1 min 40 s with 2 worker(s)" in Estimate(400, 0.5, 2, 30).describe()
    assert "no live worker" in Estimate(10, 0.5, 0, 3).describe()
    assert "no job of this run has finished yet" in Estimate(10, None, 1, 0).describe()
    plan = Plan(expand(spec(), sources(1)), {}, {})
    plan.states = {c.job_id: s for c, s in zip(plan.cells, [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.QUEUED,
                                                            None, None, None, None, None], strict=True)}
    assert (plan.done, plan.ended_badly, plan.in_flight, plan.new) == (1, 1, 1, 5)
    assert len(plan.to_follow(retry_failed=True)) == 7 and len(plan.to_follow(retry_failed=False)) == 6


def test_augment_imports_without_torch_numpy_or_pyarrow() -> None:
    from .test_producer_without_torch import run

    result = run("import sys, darkroom.producer.augment, darkroom.producer.cli_augment\n"
                 "assert not {'torch', 'numpy', 'pyarrow', 'PIL'} & set(sys.modules), sorted(sys.modules)\n"
                 "print('ok')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_augment_package_exports_the_intended_names() -> None:
    import darkroom.producer.augment as augment

    assert sorted(augment.__all__) == sorted([
        "COLUMNS", "DEFAULT_WINDOW", "AugmentSpec", "Augmentation", "Cell", "DatasetFiles", "Estimate", "Plan",
        "Progress", "RunReport", "Source", "SpecConflict", "cell_id", "expand", "export", "list_sources",
        "load_spec_file", "parse_adapter_set", "parse_seeds", "read_metadata", "spec_uri",
    ])
    for name in augment.__all__:
        assert getattr(augment, name) is not None


def test_a_batch_whose_round_trip_was_lost_goes_back_to_the_front_of_the_line() -> None:
    import redis

    from darkroom.common.jobs import Img2ImgJob
    from darkroom.producer.augment.submitter import Submitter

    class LostPipeline:
        def execute(self) -> list[Any]:
            raise redis.ConnectionError("Connection closed by server.")

    class Connection:  # stands in for the client only to lose one round trip; the real case: test_augment_stop
        def pipeline(self, transaction: bool = True) -> LostPipeline:
            return LostPipeline()

    class Stager:
        def stage(self, *args: Any, **kwargs: Any) -> None:
            pass

    jobs = [Img2ImgJob(model="tiny", image="s3://bkt/in.png", prompt="x", job_id=f"job-{i}") for i in range(5)]
    submitter = Submitter(Connection(), Stager(), lambda model: "q", jobs, total=5, done=0, window=4,  # type: ignore[arg-type]
                          chunk=3)
    with pytest.raises(redis.ConnectionError):
        submitter._send()
    assert [job.job_id for job in submitter.waiting] == [f"job-{i}" for i in range(5)]
    assert submitter.progress().submitted == 0 and not submitter.in_flight
