"""A run's outputs as a dataset: the manifest, an ``imagefolder`` layout, the failure report, a local export.

Written at the run's output prefix::

    manifest.jsonl, manifest.parquet   one row per output image (one per cell that made none): source URI,
                                       output URI, every job parameter, the image's seed, safety flags, status
    metadata.jsonl                     ``imagefolder`` metadata: one row per public output image, with
                                       ``file_name`` relative to the prefix ({job_id}/000.png)
    failures.jsonl                     the cells that failed or were cancelled, with their error codes

:func:`export` downloads the images and ``metadata.jsonl`` into a folder that
``datasets.load_dataset("imagefolder", data_dir=folder)`` loads. Parquet needs pyarrow
(``darkroom-producer[augment]``); it is imported only to write it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkroom.common.errors import DarkroomError
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.jobstore import JobRecord, job_key
from darkroom.common.objectstore import ObjectStore
from darkroom.common.results import JobResult, OutputImage
from darkroom.common.status import JobStatus
from darkroom.common.storage import S3Uri, result_uri

from .grid import Cell
from .spec import AugmentSpec, canonical_json

__all__ = ["COLUMNS", "DatasetFiles", "build_rows", "export", "read_metadata", "write_dataset"]

COLUMNS = ("job_id", "status", "source_uri", "source_identity", "source_name", "output_uri", "output_index",
           "model", "prompt", "negative_prompt", "strength", "num_inference_steps", "guidance_scale", "seed",
           "adapters", "nsfw", "safety_action", "safety_score", "error_code", "error_message")
"""The manifest's leading columns; other job parameters and the sources' manifest columns follow."""
_LEFT_OUT = {"job_id", "image", "output_prefix", "priority", "callback_url", "webhook_events", "producer"}
_FAILED = {JobStatus.FAILED.value, JobStatus.CANCELLED.value}
_THREADS = 16


@dataclass(frozen=True)
class DatasetFiles:
    """What :func:`write_dataset` wrote: URIs, and how many rows, images and failures."""

    manifest: str
    manifest_parquet: str | None
    metadata: str
    failures: str
    rows: int
    images: int
    failed: int


def build_rows(spec: AugmentSpec, cells: Sequence[Cell], redis: Any, store: ObjectStore) -> list[dict[str, Any]]:
    """The manifest's rows, in grid order, from the jobs' records (or their result.json once records expired)."""
    records: dict[str, JobRecord] = {}
    for start in range(0, len(cells), 1000):
        part = cells[start:start + 1000]
        for cell, raw in zip(part, redis.mget([job_key(c.job_id) for c in part]), strict=True):
            if raw is not None:
                records[cell.job_id] = JobRecord.model_validate_json(raw)
    expired = [c for c in cells if c.job_id not in records]
    with ThreadPoolExecutor(_THREADS) as pool:
        results = dict(zip([c.job_id for c in expired],
                           pool.map(lambda c: _committed(store, spec.output_prefix, c.job_id), expired), strict=True))
    rows = [row for cell in cells for row in _cell_rows(spec, cell, records.get(cell.job_id), results.get(cell.job_id))]
    return _uniform(rows)


def write_dataset(spec: AugmentSpec, rows: Sequence[dict[str, Any]], store: ObjectStore) -> DatasetFiles:
    """Write the manifest (JSONL, and Parquet when pyarrow is installed), metadata.jsonl and failures.jsonl."""
    root = S3Uri.parse(spec.output_prefix, allow_empty_key=True)
    metadata = _metadata(spec, rows)
    failures = [r for r in rows if r["status"] in _FAILED]
    put = {"manifest.jsonl": _jsonl(rows), "metadata.jsonl": _jsonl(metadata), "failures.jsonl": _jsonl(failures)}
    for name, data in put.items():
        store.put_bytes(root.join(name), data, content_type="application/x-ndjson")
    parquet = _parquet(rows)
    if parquet is not None:
        store.put_bytes(root.join("manifest.parquet"), parquet, content_type="application/vnd.apache.parquet")
    return DatasetFiles(str(root.join("manifest.jsonl")), str(root.join("manifest.parquet")) if parquet else None,
                        str(root.join("metadata.jsonl")), str(root.join("failures.jsonl")), len(rows),
                        len(metadata), len(failures))


def read_metadata(output_prefix: str, store: ObjectStore) -> list[dict[str, Any]]:
    """The ``metadata.jsonl`` a run wrote (one row per public output image)."""
    data = store.get_bytes(S3Uri.parse(output_prefix, allow_empty_key=True).join("metadata.jsonl"))
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def export(output_prefix: str, folder: str | Path, store: ObjectStore) -> int:
    """Download a run's images and ``metadata.jsonl`` into ``folder`` (an ``imagefolder`` dataset); files already
    there are kept. Returns the number of images."""
    folder = Path(folder)
    rows = read_metadata(output_prefix, store)
    root = S3Uri.parse(output_prefix, allow_empty_key=True)
    targets = [_inside(folder, str(row["file_name"])) for row in rows]  # every one, before anything is written

    def fetch(row: dict[str, Any], target: Path) -> None:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(store.get_bytes(root.join(row["file_name"])))
            partial.replace(target)

    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(fetch, rows, targets))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_bytes(_jsonl(rows))
    return len(rows)


def _inside(folder: Path, file_name: str) -> Path:
    """``folder / file_name`` when it stays inside ``folder`` (metadata.jsonl is read from the bucket: a row
    naming ``/etc/...`` or ``../`` must not write there)."""
    base = folder.resolve()
    target = (base / file_name).resolve()
    if not file_name or file_name.startswith("/") or not target.is_relative_to(base) or target == base:
        raise DarkroomError(f"metadata.jsonl names file {file_name!r}, which is not inside {base}; nothing "
                            "was exported")
    return target


# -- rows ------------------------------------------------------------------------
def _cell_rows(spec: AugmentSpec, cell: Cell, record: JobRecord | None, result: JobResult | None) -> list[dict[str, Any]]:
    job = Img2ImgJob.model_validate(cell.job(spec))
    params = {k: _cell_value(v) for k, v in job.model_dump(mode="json").items() if k not in _LEFT_OUT}
    base = {"job_id": cell.job_id, "source_uri": cell.source.uri, "source_identity": cell.source.identity,
            "source_name": cell.source.name, **params,
            **{_source_column(k): _cell_value(v) for k, v in cell.source.row.items()
               if k not in Img2ImgJob.model_fields}}
    if record is not None and record.result is not None:
        result = record.result
    if result is not None:
        return [{**base, **_output(o), "status": JobStatus.SUCCEEDED.value} for o in result.outputs]
    status = record.status.value if record is not None else "not_run"
    return [{**base, "status": status, "output_uri": None, "output_index": None,
             "error_code": record.error_code if record else None,
             "error_message": record.error_message if record else None}]


def _output(output: OutputImage) -> dict[str, Any]:
    safety = output.safety
    return {"output_uri": output.uri, "output_index": output.index, "seed": output.seed, "nsfw": output.nsfw,
            "safety_action": safety.action.value if safety else None, "safety_score": safety.score if safety else None,
            "error_code": None, "error_message": None}


def _committed(store: ObjectStore, output_prefix: str, job_id: str) -> JobResult | None:
    from darkroom.common.errors import ObjectNotFoundError

    try:
        return JobResult.model_validate_json(store.get_bytes(result_uri(output_prefix, job_id)))
    except ObjectNotFoundError:
        return None


def _metadata(spec: AugmentSpec, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``imagefolder`` rows: ``file_name`` (relative to the prefix) first, for every public output image."""
    root = spec.output_prefix.rstrip("/") + "/"
    return [{"file_name": r["output_uri"][len(root):], **r} for r in rows
            if r["status"] == JobStatus.SUCCEEDED.value and r["output_uri"] and r["output_uri"].startswith(root)]


def _uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with the same columns, in the same order (Parquet and ``datasets`` want one schema)."""
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    return [{k: r.get(k) for k in (*COLUMNS, *extra)} for r in rows]


def _cell_value(value: Any) -> Any:
    """Scalars as they are; lists and objects as canonical JSON text (one type per column)."""
    return canonical_json(value) if isinstance(value, (list, dict)) else value


def _source_column(name: str) -> str:
    return f"source_{name}" if name in COLUMNS or name == "file_name" else name


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _parquet(rows: Sequence[dict[str, Any]]) -> bytes | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows)), buffer)
    return buffer.getvalue()
