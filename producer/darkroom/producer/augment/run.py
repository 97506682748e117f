"""One augmentation run: its spec saved at the output prefix, its plan, its jobs, and its dataset.

    from darkroom.producer import Client
    from darkroom.producer.augment import Augmentation, AugmentSpec

    with Client.from_env() as client:
        spec = AugmentSpec.build({"model": "tiny", "sources": "s3://darkroom/photos/",
                                  "output_prefix": "s3://darkroom/aug/photos-v1",
                                  "prompts": ["{stem}, watercolor"], "strengths": [0.4, 0.6], "seeds": [0, 1]})
        run = Augmentation(client, spec)
        print(run.plan().count())               # a dry run: nothing is written
        report = run.run(window=256)            # submit, follow, write the manifest when all ended
        run.export("dataset/")                  # datasets.load_dataset("imagefolder", data_dir="dataset/")

The run's spec lives at ``{output_prefix}/_augment/spec.json`` with the run id (a hash of the spec), so the
same command, or :meth:`Augmentation.resume`, carries on where it stopped.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from darkroom.common.augment_keys import RunState
from darkroom.common.errors import FieldError, InvalidJobError, ObjectNotFoundError
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.storage import S3Uri

from .. import _submission as submission
from .dataset import DatasetFiles, build_rows, export, write_dataset
from .grid import Cell, expand
from .plan import Estimate, Plan, read_states
from .sources import Source, list_sources, upload_sources
from .spec import AugmentSpec, InvalidSpecError
from .submitter import Progress, RunBoard, Submitter

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["Augmentation", "RunReport", "SpecConflict", "spec_uri"]

DEFAULT_WINDOW = 256


def spec_uri(output_prefix: str) -> S3Uri:
    """Where a run keeps its spec and id."""
    return S3Uri.parse(output_prefix, allow_empty_key=True).join("_augment", "spec.json")


class SpecConflict(InvalidSpecError):
    """Raised when the output prefix holds a run of another spec (``update_spec=True`` replaces it)."""


@dataclass(frozen=True)
class RunReport:
    """How a run ended: finished (every cell ended) or stopped, the last counts and, when finished, the dataset."""

    run_id: str
    finished: bool
    progress: Progress
    dataset: DatasetFiles | None


class Augmentation:
    """A spec over its sources: plan it, run it, collect and export its dataset. Never imports torch."""

    def __init__(self, client: Client, spec: AugmentSpec) -> None:
        self.client = client
        self.spec = spec

    @classmethod
    def resume(cls, client: Client, output_prefix: str) -> Augmentation:
        """The run saved at ``output_prefix``; raises InvalidJobError when there is none."""
        try:
            saved = json.loads(client.store.get_bytes(spec_uri(output_prefix)))
        except ObjectNotFoundError:
            raise InvalidSpecError([FieldError("resume", output_prefix, f"no augmentation run here ({spec_uri(output_prefix)} "
                                              "does not exist)", "the output prefix of an earlier run")]) from None
        return cls(client, AugmentSpec.build(saved["spec"]))

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    # -- what the run is made of --------------------------------------------------
    @cached_property
    def sources(self) -> list[Source]:
        return list_sources(self.spec.sources, self.spec.upload_prefix, self.client.store)

    @cached_property
    def cells(self) -> list[Cell]:
        return expand(self.spec, self.sources, submission.namespace(self.client.settings))

    @cached_property
    def jobs(self) -> dict[str, Img2ImgJob]:
        """Every cell's job by id, validated and completed as ``Client.submit`` would (bulk priority, explicit
        ids); raises InvalidJobError naming the cells at fault (``cells[17].prompt``)."""
        try:
            jobs = submission.prepare_many([c.job(self.spec) for c in self.cells], self.client.settings,
                                           self.client.fleet.catalog(), self.client.own_policy())
        except InvalidJobError as exc:
            raise InvalidJobError([FieldError(e.field.replace("jobs[", "cells[", 1), e.value, e.message, e.allowed)
                                   for e in exc.errors[:20]]) from None
        return {job.job_id or "": job for job in jobs}

    def validate(self) -> int:
        """Check every cell's job (InvalidJobError names the cells at fault); return how many there are."""
        return len(self.jobs)

    def plan(self) -> Plan:
        """Each cell's status now, once every cell's job is known to be valid; reads only (a dry run)."""
        self.validate()
        return read_states(self.client.jobs.redis, self.client.store, self.cells, self.spec.output_prefix)

    def estimate(self, plan: Plan, retry_failed: bool = True) -> Estimate:
        median, sample = plan.median_job_seconds()
        workers = sum(1 for w in self.client.fleet.workers(fresh=True) if self.spec.model in w.models)
        return Estimate(len(plan.to_follow(retry_failed)), median, workers, sample)

    # -- running ----------------------------------------------------------------------
    def run(self, *, window: int = DEFAULT_WINDOW, retry_failed: bool = True, update_spec: bool = False,
            stop: threading.Event | None = None, on_progress: Callable[[Progress], None] | None = None,
            on_plan: Callable[[Plan], None] | None = None, collect: bool = True) -> RunReport:
        """Upload local sources, save the spec, submit every cell not done (failed and cancelled ones again unless
        ``retry_failed`` is False) with at most ``window`` in flight, follow them, then write the dataset.

        Returns when every cell ended, or as soon as ``stop`` is set (jobs already sent keep running; run the
        same spec again to resume). Raises SpecConflict when the prefix holds another spec's run.
        """
        self.validate()  # every job is valid before anything is written
        self.save_spec(update=update_spec)
        upload_sources(self.sources, self.client.store, self.spec.upload_prefix)
        plan = self.plan()
        if on_plan is not None:
            on_plan(plan)
        follow = plan.to_follow(retry_failed)
        submitter = Submitter(
            self.client.jobs.redis, self.client._stager, self.client.fleet.queue_for, [self.jobs[c.job_id] for c in follow],
            total=len(self.cells), done=plan.done, failed=0 if retry_failed else plan.ended_badly, window=window,
            recorded=[job_id for job_id, status in plan.states.items() if status is not None], stop=stop,
            on_progress=on_progress,
            board=RunBoard(self.client.jobs.redis, self.run_id, output_prefix=self.spec.output_prefix,
                           model=self.spec.model, ttl=self.client.settings.status_ttl_seconds),
        )
        finished = submitter.run()
        dataset = self.collect() if finished and collect else None
        state = RunState.FINISHED if finished else RunState.STOPPED
        return RunReport(self.run_id, finished, submitter.progress(state), dataset)

    def save_spec(self, *, update: bool = False) -> None:
        """Keep the spec at the output prefix; refuse a prefix that holds another spec's run unless ``update``."""
        uri = spec_uri(self.spec.output_prefix)
        body = json.dumps({"run_id": self.run_id, "spec": self.spec.model_dump(mode="json"),
                           "saved_at": datetime.now(UTC).isoformat()}, indent=2).encode()
        if self.client.store.put_bytes(uri, body, content_type="application/json", if_absent=True):
            return
        saved = json.loads(self.client.store.get_bytes(uri))
        if saved.get("run_id") == self.run_id:
            return
        if not update:
            raise SpecConflict([FieldError("output_prefix", self.spec.output_prefix,
                                           f"holds run {saved.get('run_id')} of another spec ({uri})",
                                           "the same spec (resume it), update_spec to replace the saved spec "
                                           "(finished cells are reused), or another prefix")])
        self.client.store.put_bytes(uri, body, content_type="application/json")

    # -- the dataset ------------------------------------------------------------------------
    def collect(self) -> DatasetFiles:
        """Write the manifest, metadata.jsonl and failures.jsonl from the cells' records as they are now."""
        rows = build_rows(self.spec, self.cells, self.client.jobs.redis, self.client.store)
        return write_dataset(self.spec, rows, self.client.store)

    def export(self, folder: str | Path) -> int:
        """Download the images and metadata.jsonl into ``folder``; returns the number of images."""
        return export(self.spec.output_prefix, folder, self.client.store)
