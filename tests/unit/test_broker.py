"""The broker messages submit_many writes are the ones Celery's own send_task writes (captured from a real Redis)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from darkroom.common.broker import ARGSREPR_MAX, task_message
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.queues import TASK_IMG2IMG, broker_list, celery_config, cold_queue
from darkroom.common.settings import Settings
from darkroom.dev.embedded import resolve_redis_server

# argsrepr (what workers log) is Python's repr, cut at 1024 characters; Celery's saferepr differs only in
# quoting strings that hold quotes, hence a prompt without any here
JOB = Img2ImgJob(model="tiny", image="s3://darkroom/in/cat.png", prompt="a cat, oil painting", seed=7,
                 job_id="job-1", output_prefix="s3://darkroom/out", producer="default")


@pytest.fixture(scope="module")
def redis_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A bare redis-server on a unix socket (no TCP port), for this module only."""
    root = tmp_path_factory.mktemp("redis")
    socket = root / "redis.sock"
    proc = subprocess.Popen([resolve_redis_server(), "--port", "0", "--unixsocket", str(socket), "--save", "",
                             "--appendonly", "no", "--dir", str(root)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield socket
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture()
def rdb(redis_socket: Path) -> Iterator[redis.Redis]:
    client = redis.Redis(unix_socket_path=str(redis_socket))
    client.flushall()
    yield client
    client.close()


def sent_by_celery(redis_socket: Path, rdb: redis.Redis, queue: str, priority: int) -> tuple[str, dict[str, Any]]:
    """The list key and envelope that Celery's send_task stores for JOB."""
    from celery import Celery

    app = Celery("darkroom-producer", set_as_current=False)
    app.conf.update(celery_config(Settings()))
    app.conf.broker_url = f"redis+socket://{redis_socket}"
    try:
        app.send_task(TASK_IMG2IMG, args=[JOB.model_dump(mode="json")], task_id=JOB.job_id, queue=queue,
                      priority=priority)
    finally:
        app.close()
    lists = [k.decode() for k in rdb.keys("*") if rdb.type(k) == b"list"]
    assert len(lists) == 1, lists
    (raw,) = rdb.lrange(lists[0], 0, -1)
    return lists[0], json.loads(raw)


@pytest.mark.parametrize("priority", [0, 6])
def test_envelope_equals_what_celery_send_task_stores(redis_socket: Path, rdb: redis.Redis, priority: int) -> None:
    # Given the message Celery itself stored for a job on a model's cold queue
    queue = cold_queue("tiny")
    celery_key, celery_envelope = sent_by_celery(redis_socket, rdb, queue, priority)
    # When ours is built for the same job, queue and priority
    key, raw = task_message(TASK_IMG2IMG, JOB.job_id or "", [JOB.model_dump(mode="json")], queue=queue,
                            priority=priority, sender=celery_envelope["headers"]["origin"])
    ours = json.loads(raw)
    # Then it goes to the same Redis list, with the same body (as JSON values), headers and properties
    assert key == celery_key == (queue if priority == 0 else f"{queue}:{priority}")
    body = json.loads(base64.b64decode(ours.pop("body")))
    assert body == json.loads(base64.b64decode(celery_envelope.pop("body")))
    assert body[0] == [JOB.model_dump(mode="json")]
    # argsrepr, what workers log, is cut to 1024 characters; past that Celery's saferepr elides inside the dict
    # while ours cuts the end, so a long job's summaries agree on their start and their limit only
    ours_repr, celery_repr = ours["headers"].pop("argsrepr"), celery_envelope["headers"].pop("argsrepr")
    if len(celery_repr) < ARGSREPR_MAX:
        assert ours_repr == celery_repr
    else:
        assert ours_repr[:200] == celery_repr[:200] and len(ours_repr) <= ARGSREPR_MAX
    assert ours["headers"] == celery_envelope["headers"]
    # ...but for what is per message or per sender: a fresh delivery tag and no reply channel (no results)
    for envelope in (ours, celery_envelope):
        assert uuid.UUID(envelope["properties"].pop("delivery_tag"))
        envelope["properties"].pop("reply_to")
    assert ours == celery_envelope


def test_each_message_gets_its_own_delivery_tag() -> None:
    tags = {json.loads(task_message(TASK_IMG2IMG, "j", [{}], queue="q", priority=0, sender="s")[1])
            ["properties"]["delivery_tag"] for _ in range(3)}
    assert len(tags) == 3


def test_priority_lists_follow_kombus_sep_and_steps() -> None:
    assert broker_list("q", 0) == "q"
    assert broker_list("q", 1) == "q:1"
    assert broker_list("q", 9) == "q:9"
    for bad in (-1, 10):
        with pytest.raises(ValueError, match="not one of 0..9"):
            broker_list("q", bad)


def test_argsrepr_is_cut_like_celerys() -> None:
    job = JOB.model_copy(update={"prompt": "x" * 3000}).model_dump(mode="json")
    headers = json.loads(task_message(TASK_IMG2IMG, "j", [job], queue="q", priority=0, sender="s")[1])["headers"]
    assert len(headers["argsrepr"]) == ARGSREPR_MAX and headers["argsrepr"].endswith("...")


def test_restoring_an_unacked_message_matches_kombus_own_restore(redis_socket: Path, rdb: redis.Redis) -> None:
    """What the reclaimer pushes back for a dead worker's message is what kombu's own restore pushes."""
    from kombu import Connection

    from darkroom.common.broker import UNACKED, queued_task_id, restored

    # Given a job message taken by a kombu consumer that never acknowledges it (it sits in "unacked")
    queue = cold_queue("tiny")
    key, raw = task_message(TASK_IMG2IMG, "job-9", [JOB.model_dump(mode="json")], queue=queue, priority=6,
                            sender="test")
    rdb.lpush(key, raw)
    options = {**celery_config(Settings())["broker_transport_options"], "visibility_timeout": 0}
    with Connection(f"redis+socket://{redis_socket}", transport_options=options) as conn:
        consumer = conn.SimpleQueue(queue, no_ack=False)
        message = consumer.get(timeout=10)
        assert message.headers["id"] == "job-9"
        (unacked,) = rdb.hvals(UNACKED)
        assert queued_task_id(unacked, unacked=True) == "job-9"
        ours = restored(unacked)
        # When kombu restores it itself (visibility timeout passed)
        conn.default_channel.qos.restore_visible(num=10)
        consumer.close()
    # Then both put the same message on the same list
    assert ours is not None
    lists = [k.decode() for k in rdb.keys("darkroom.img2img*") if rdb.type(k) == b"list"]
    assert lists == [ours[0]]
    (theirs,) = rdb.lrange(ours[0], 0, -1)
    assert json.loads(theirs) == json.loads(ours[1])


def test_unreadable_queue_entries_have_no_job_id() -> None:
    from darkroom.common.broker import queued_task_id, restored

    for junk in (b"not json", b"[1, 2]", b"{}", b'"text"'):
        assert queued_task_id(junk) is None
        assert queued_task_id(junk, unacked=True) is None
    assert restored(b"garbage") is None
