"""Helpers of the integration tests: worker processes, pools, senders and waits on observable events.

Plain functions and classes, imported by the test modules; the fixtures built on them live in conftest.py.
"""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from darkroom.common.jobstore import JobRecord
from darkroom.common.settings import Settings
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client, JobHandle

from ..helpers import png_bytes, wait_until

__all__ = ["CHAOS_ENV", "Pool", "celery_sender", "events", "free_port", "plain_pipeline", "scrape",
           "spawn_worker", "start_worker", "submit", "wait_for_record", "wait_webhooks_settled",
           "webhooks_pending"]


def spawn_worker(services: object, settings: Settings, name: str, *args: str, state_dir: Path | None = None,
                 **env: str) -> WorkerProcess:
    """A `darkroom worker ARGS` subprocess (not started yet) on the session's services.

    ``env`` adds DARKROOM_* overrides; its log goes to ``<state_dir>/logs/<name>.log``.
    """
    state = state_dir or settings.state_dir
    full = {**services.as_env(), "DARKROOM_STATE_DIR": str(state), **env}  # type: ignore[attr-defined]
    return WorkerProcess(name, list(args), env=full, redis_url=full["DARKROOM_REDIS_URL"],
                         log_path=state / "logs" / f"{name}.log")


def simulated_workers(services: object, settings: Settings, profile: Path, prefix: str, models: list[str],
                      **env: str) -> list[WorkerProcess]:
    """One started ``darkroom worker --simulate PROFILE`` per model of ``models``, each preloading its model."""
    return [spawn_worker(services, settings, f"{prefix}{i}-{uuid.uuid4().hex[:6]}", "--simulate", str(profile),
                         "--preload-model", model, DARKROOM_METRICS_PORT="0", **env).start(timeout=60)
            for i, model in enumerate(models)]


def start_worker(services: object, settings: Settings, tiny_model: Path, *extra: str) -> WorkerProcess:
    """A started worker serving the tiny model as ``tiny`` (plus ``extra`` arguments)."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    return spawn_worker(services, settings, name, "--model", f"tiny={tiny_model}", *extra).start(timeout=120)


def plain_pipeline(model_dir: Path) -> Any:
    """diffusers' own img2img pipeline for ``model_dir``, loaded the way a diffusers user would (the reference
    that worker outputs are compared with)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(model_dir), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CHAOS_ENV = {"DARKROOM_FAULT_INJECTION": "true", "DARKROOM_LEASE_SECONDS": "2", "DARKROOM_HEARTBEAT_SECONDS": "0.5",
             "DARKROOM_MAX_DELIVERIES": "2", "DARKROOM_PROGRESS_INTERVAL_SECONDS": "0", "DARKROOM_CPU_THREADS": "1"}


class Pool:
    """Workers serving one private model id, started and stopped by the test (fault injection on, short leases)."""

    def __init__(self, services: Any, settings: Settings, tiny_model: Path) -> None:
        self.model = f"f{uuid.uuid4().hex[:6]}"
        self.services, self.settings, self.tiny_model = services, settings, tiny_model
        self.workers: list[WorkerProcess] = []

    def start(self, **env: str) -> WorkerProcess:
        worker = spawn_worker(self.services, self.settings, f"{self.model}-{len(self.workers)}", "--model",
                              f"{self.model}={self.tiny_model}", **{**CHAOS_ENV, **env}).start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.kill()


def submit(client: Client, pool: Pool, prompt: str = "a boat", steps: int = 8, **extra: Any) -> JobHandle:
    """A job for ``pool``'s model on a fresh 64 x 64 input."""
    uri = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
    client.fleet.register_models([pool.model])  # known to the fleet even before its first worker starts
    return client.submit({"model": pool.model, "image": uri, "prompt": prompt, "strength": 1.0,
                          "num_inference_steps": steps, "seed": 5, **extra})


def events(client: Client, handle: JobHandle) -> list[str]:
    """The event names in a job's history, oldest first."""
    return [e["event"] for e in client.jobs.history(handle.job_id)]


def celery_sender(client: Client, **conf: Any) -> Any:
    """A plain Celery producer on the same broker (what another, older or foreign, producer would use)."""
    from celery import Celery

    from darkroom.common.queues import celery_config

    app = Celery("other-producer", set_as_current=False)
    app.conf.update({**celery_config(client.settings), **conf})
    return app


def wait_for_record(client: Client, job_id: str, timeout: float = 120.0) -> JobRecord:
    """The job's record once one exists (a message sent past the SDK has none until a worker reads it)."""
    return wait_until(lambda: client.jobs.get(job_id), timeout, f"a record of job {job_id}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the /metrics page on ``port``, keyed by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def webhooks_pending(rdb: Any, *urls: str) -> list[str]:
    """Webhook entries for any of ``urls`` that a dispatcher has not settled yet: in the outbox, taken into a
    dispatcher's processing list, or waiting for a retry. Empty once each was delivered, dropped or buried."""
    from darkroom.common.webhooks import OUTBOX_KEY
    from darkroom.producer.webhooks.deliveries import DISPATCHERS_KEY, RETRIES_KEY, processing_key

    lists = [OUTBOX_KEY, *(processing_key(m.decode()) for m in rdb.smembers(DISPATCHERS_KEY))]
    raw = [e for key in lists for e in rdb.lrange(key, 0, -1)] + rdb.zrange(RETRIES_KEY, 0, -1)
    return [e.decode() for e in raw if json.loads(e).get("url") in urls]


def wait_webhooks_settled(rdb: Any, *urls: str, timeout: float = 20.0) -> None:
    """Wait until a dispatcher has settled every entry for ``urls`` (delivered, dropped or buried): after that,
    a request that has not reached the receiver never will."""
    wait_until(lambda: not webhooks_pending(rdb, *urls), timeout, f"the dispatcher to settle every entry for {urls}")
