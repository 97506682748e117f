"""Fair share through real Redis and a real worker: held bulk work is released by producer weight, interactive
work is not held, the autoscaler's backlog counts what is held, and the reconciler does not mistake a held
message for a lost one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from darkroom.common.clients import make_redis
from darkroom.common.fairness import FAIR_PRIORITY, Feeder, backlog, held_queue, hold, producers_key
from darkroom.common.fleet import Fleet
from darkroom.common.queues import broker_list, cold_queue
from darkroom.common.settings import Settings
from darkroom.dev.demo import sample_image
from darkroom.producer.client import Client

from ..helpers import png_bytes
from .helpers import spawn_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOB = {"prompt": "a kite", "strength": 0.5, "num_inference_steps": 4, "seed": 1}


@pytest.fixture()
def rdb(settings: Settings) -> Iterator[redis.Redis]:
    client = make_redis(settings)
    yield client
    client.close()


def hold_messages(rdb: redis.Redis, model: str, producer: str, count: int) -> None:
    for i in range(count):
        args = hold(model, producer, f"{producer}-{i}")
        for j in range(0, len(args), 3):
            rdb.execute_command(*args[j:j + 3])


def released(rdb: redis.Redis, queue: str) -> list[str]:
    """The released messages in the order a consumer takes them (oldest first)."""
    return [m.decode() for m in reversed(rdb.lrange(broker_list(queue, FAIR_PRIORITY), 0, -1))]


def test_equal_weights_alternate_whatever_the_volumes(rdb: redis.Redis) -> None:
    # Given team-a holding 6 bulk messages for a model and team-b 2 (3:1)
    model, queue = f"m{uuid.uuid4().hex[:8]}", f"q{uuid.uuid4().hex[:8]}"
    hold_messages(rdb, model, "team-a", 6)
    hold_messages(rdb, model, "team-b", 2)
    assert backlog(rdb, model) == 8
    # When workers release them a few at a time (as the queue drains)
    feeder = Feeder(rdb, depth=4)
    assert feeder.feed(model, queue) == 4
    first = released(rdb, queue)
    rdb.delete(broker_list(queue, FAIR_PRIORITY))
    assert feeder.feed(model, queue) == 4
    # Then the two alternate while both have work, and team-a's rest follows in its own order
    assert [m.split("-")[1] for m in first] == ["a", "b", "a", "b"]
    assert released(rdb, queue) == ["team-a-2", "team-a-3", "team-a-4", "team-a-5"]
    assert backlog(rdb, model) == 0 and not rdb.exists(producers_key(model))


def test_weights_share_by_weight_and_the_queue_depth_bounds_each_release(rdb: redis.Redis) -> None:
    model, queue = f"m{uuid.uuid4().hex[:8]}", f"q{uuid.uuid4().hex[:8]}"
    hold_messages(rdb, model, "big", 20)
    hold_messages(rdb, model, "small", 20)
    feeder = Feeder(rdb, depth=9)
    assert feeder.feed(model, queue, {"big": 2.0}) == 9
    assert feeder.feed(model, queue, {"big": 2.0}) == 0  # the list holds `depth` messages: nothing more
    owners = [m.rsplit("-", 1)[0] for m in released(rdb, queue)]
    assert owners.count("big") == 6 and owners.count("small") == 3
    assert rdb.llen(held_queue(model, "big")) == 14 and backlog(rdb, model) == 31


def test_bulk_work_of_two_producers_completes_in_turns_on_a_real_worker(
    services: Any, settings: Settings, tiny_model: Path, tmp_path: Path,
) -> None:
    # Given a worker serving its own model, and two producers submitting with fair share on
    model = f"fair{uuid.uuid4().hex[:6]}"
    worker = spawn_worker(services, settings, f"fair-{model}", "--model", f"{model}={tiny_model}",
                          state_dir=tmp_path / "state", DARKROOM_BATCH_MAX_IMAGES="1", DARKROOM_CPU_THREADS="1")
    clients = {p: Client(settings.model_copy(update={"producer_id": p, "fair_share": True})) for p in ("a", "b")}
    try:
        a, b = clients["a"], clients["b"]
        a.fleet.register_models([model])  # known to the fleet before its worker starts
        image = a.upload(png_bytes(sample_image(64)), f"s3://darkroom/fair/{uuid.uuid4().hex}.png")
        job = {"model": model, "image": image, **JOB}
        # When team a floods first (9 bulk jobs), then team b (3), then one interactive job of team a arrives,
        # all before the worker starts (so no release can slip in between the two floods)
        bulk_a = a.submit_many([{**job, "priority": "bulk", "seed": i} for i in range(9)])
        bulk_b = b.submit_many([{**job, "priority": "bulk", "seed": i} for i in range(3)])
        urgent = a.submit({**job, "seed": 99})
        assert backlog(a.jobs.redis, model) == 12  # the bulk work is held, the interactive job is not
        assert a.jobs.redis.llen(broker_list(cold_queue(model), 0)) == 1
        worker.start(timeout=120)
        results = {h.job_id: h.wait(timeout=180) for h in [*bulk_a, *bulk_b, urgent]}
        # Then team b's three run among the first six bulk jobs (FIFO: after all nine of team a's)
        starts = sorted((a.jobs.require(j).created_at.timestamp() + (r.timings.queue_wait or 0), j)
                        for j, r in results.items() if j != urgent.job_id)
        order = ["b" if j in {h.job_id for h in bulk_b} else "a" for _, j in starts]
        assert order[:6].count("b") == 3, order
        assert backlog(a.jobs.redis, model) == 0
    finally:
        worker.stop()
        for client in clients.values():
            client.close()


def test_a_held_message_is_not_taken_for_a_lost_one(services: Any, settings: Settings, rdb: redis.Redis) -> None:
    from darkroom.common.jobs import validate_job
    from darkroom.common.lifecycle import Lifecycle
    from darkroom.worker.recovery import RECONCILER_LAST, Reconciler

    # Given a bulk job held for fair share (no worker serves its model), and an open job whose message was lost
    model = f"held{uuid.uuid4().hex[:6]}"
    Fleet(rdb).register_models([model])  # in the catalog, served by no live worker
    with Client(settings.model_copy(update={"fair_share": True})) as client:
        held = client.submit({"model": model, "image": "s3://darkroom/in/x.png", **JOB, "priority": "bulk"})
        lost = validate_job({"model": model, "image": "s3://darkroom/in/x.png", **JOB, "job_id": uuid.uuid4().hex})
        client.jobs.create(lost)
    assert rdb.llen(held_queue(model, "default")) == 1 and backlog(rdb, model) == 1
    # When the reconciler looks for open jobs without a message, past its grace period
    rdb.delete(RECONCILER_LAST)
    requeued = Reconciler(rdb, Lifecycle(rdb), grace_seconds=0, interval_seconds=5, owner="test").run_once()
    # Then it enqueues the lost one again and leaves the held one held
    assert lost.job_id in requeued and held.job_id not in requeued
    assert rdb.llen(held_queue(model, "default")) == 1
    for job_id in (held.job_id, lost.job_id or ""):
        Lifecycle(rdb).cancel(job_id)
