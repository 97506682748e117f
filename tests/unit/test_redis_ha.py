"""Redis HA settings, the Sentinel-backed client factory, the Celery sentinel:// broker and durable submissions.

Nothing here connects: building a Sentinel-managed client or a kombu connection does not open a socket. The
failover itself runs on real servers in tests/integration/test_redis_ha.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import redis.asyncio.sentinel
import redis.sentinel
from pydantic import ValidationError

from darkroom.common.clients import make_async_redis, make_redis
from darkroom.common.errors import DarkroomError, NotReplicated, RedisUnavailable, TransientError
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.jobstore import JobRecord
from darkroom.common.queues import celery_config
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.dev.embedded import EmbeddedServices
from darkroom.dev.embedded_ha import HAEndpoints, HAServices, services_for
from darkroom.producer import _durable

SENTINELS = "10.0.0.1:26379, 10.0.0.2:26380,10.0.0.3:26381"


def ha(**extra: object) -> Settings:
    return Settings.model_validate({"redis_url": "redis://:pw@ignored:1/3", "redis_sentinels": SENTINELS,
                                    "redis_sentinel_password": "spw", **extra})


def test_sentinels_come_comma_separated_or_as_json_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_REDIS_SENTINELS", SENTINELS)
    assert Settings().sentinel_addresses == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26381)]
    monkeypatch.setenv("DARKROOM_REDIS_SENTINELS", '["a:1", "b:2"]')
    assert Settings().redis_sentinels == ["a:1", "b:2"]


@pytest.mark.parametrize("bad", ["nohost", "h:0", "h:99999", ":26379", "h:port"])
def test_a_sentinel_that_is_not_host_port_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(ValidationError, match=rf"redis_sentinels entry '{bad}' is not host:port"):
        Settings(redis_sentinels=[bad])


def test_wait_replicas_default_to_one_under_sentinel_and_zero_without() -> None:
    assert Settings().wait_replicas == 0
    assert ha().wait_replicas == 1
    assert ha(redis_wait_replicas=0).wait_replicas == 0
    assert Settings(redis_wait_replicas=2).wait_replicas == 2


def test_a_wait_longer_than_the_socket_timeout_is_refused() -> None:
    with pytest.raises(ValidationError, match="redis_wait_timeout_ms=5000 must be below redis_socket_timeout_seconds"):
        ha(redis_wait_timeout_ms=5000, redis_socket_timeout_seconds=2)
    assert Settings(redis_wait_timeout_ms=5000, redis_socket_timeout_seconds=2).wait_replicas == 0  # no WAIT: fine


def test_the_sentinel_password_never_prints() -> None:
    assert "spw" not in repr(ha()) and "spw" not in ha().model_dump_json()


def test_the_factory_builds_sentinel_managed_clients_with_the_urls_credentials() -> None:
    client = make_redis(ha())
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool) and pool.service_name == "darkroom"
    assert pool.connection_kwargs["password"] == "pw" and pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["socket_timeout"] == 15.0  # nothing waits forever
    assert pool.connection_class is redis.sentinel.SentinelManagedConnection
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380, 26381]
    assert all(s.connection_pool.connection_kwargs["password"] == "spw" for s in sentinels)

    tls = make_redis(ha(redis_url="rediss://:pw@x:1/0", redis_master_name="m", redis_sentinel_tls=True))
    assert tls.connection_pool.connection_class is redis.sentinel.SentinelManagedSSLConnection
    assert tls.connection_pool.service_name == "m"
    assert all(s.connection_pool.connection_class is redis.SSLConnection for s in tls.connection_pool.sentinel_manager.sentinels)


def test_the_async_factory_builds_a_sentinel_managed_client() -> None:
    pool = make_async_redis(ha()).connection_pool
    assert isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool) and pool.service_name == "darkroom"
    assert pool.connection_kwargs["password"] == "pw"


def test_without_sentinels_the_clients_use_the_url() -> None:
    pool = make_redis(Settings(redis_url="redis://:pw@h:7/2")).connection_pool  # type: ignore[arg-type]
    assert type(pool) is redis.ConnectionPool and pool.connection_kwargs["host"] == "h"


def test_celery_uses_kombus_sentinel_transport_with_the_master_name_and_sentinel_password() -> None:
    from kombu import Connection

    config = celery_config(ha())
    assert config["broker_url"] == ";".join(f"sentinel://:pw@{s.strip()}/3" for s in SENTINELS.split(","))
    options = config["broker_transport_options"]
    assert options["master_name"] == "darkroom" and options["sentinel_kwargs"]["password"] == "spw"
    assert options["priority_steps"] == list(range(10))  # the plain transport's options are kept
    connection = Connection(config["broker_url"], transport_options=options)
    assert connection.transport_cls == "sentinel" and len(connection.alt) == 3
    assert celery_config(Settings())["broker_url"].startswith("redis://")


def test_wait_ends_the_pipeline_and_its_reply_is_split_off() -> None:
    class Pipe:
        commands: list[tuple[object, ...]] = []

        def execute_command(self, *args: object) -> None:
            self.commands.append(args)

    pipe = Pipe()
    _durable.add_wait(pipe, 0, 100)
    assert pipe.commands == []
    _durable.add_wait(pipe, 1, 250)
    assert pipe.commands == [("WAIT", 1, 250)]
    assert _durable.split_wait([1, 1, 0], 1) == ([1, 1], 0)
    assert _durable.split_wait([1, 1], 0) == ([1, 1], None)


def test_too_few_replicas_raise_a_retryable_not_replicated_naming_the_jobs() -> None:
    job = Img2ImgJob(job_id="j1", model="m", image="s3://bucket/k.png", prompt="p")
    _durable.require_replicas(1, 1, 100, [job])
    _durable.require_replicas(None, 1, 100, [job])
    with pytest.raises(NotReplicated, match="0 of the 1 replica") as caught:
        _durable.require_replicas(0, 1, 100, [job])
    error = caught.value
    assert isinstance(error, RedisUnavailable) and isinstance(error, TransientError) and error.retryable
    assert error.job_ids == ["j1"] and error.jobs == [job]
    assert not DarkroomError.retryable


@pytest.mark.parametrize("raised", [redis.ConnectionError("refused"), redis.TimeoutError("slow"),
                                    redis.exceptions.ReadOnlyError("READONLY"),
                                    redis.sentinel.MasterNotFoundError("No master found for 'darkroom'")])
def test_redis_errors_become_retryable_redis_unavailable(raised: Exception) -> None:
    job = Img2ImgJob(job_id="j2", model="m", image="s3://bucket/k.png", prompt="p")
    with (pytest.raises(RedisUnavailable, match="Redis is unavailable or failing over; could not submit") as caught,
          _durable.redis_unavailable("submit the jobs", [job])):
        raise raised
    assert caught.value.__cause__ is raised and caught.value.jobs == [job] and caught.value.retryable


def test_a_retry_of_a_recorded_job_counts_as_submitted_unless_it_ended_failed() -> None:
    job = Img2ImgJob(job_id="j3", model="m", image="s3://bucket/k.png", prompt="p", seed=1)
    now = datetime.now(UTC)
    record = JobRecord(job_id="j3", status=JobStatus.QUEUED, job=job, created_at=now, updated_at=now)
    assert _durable.already_submitted(record, job)
    assert not _durable.already_submitted(record, job.model_copy(update={"seed": 2}))
    assert not _durable.already_submitted(record.evolve(status=JobStatus.FAILED), job)
    assert not _durable.already_submitted(None, job)


def test_ha_endpoints_add_the_sentinels_and_redact_their_password(tmp_path: Path) -> None:
    endpoints = HAEndpoints("redis://:pw@127.0.0.1:1/0", "http://127.0.0.1:2", "AK", "SK",
                            sentinels=("127.0.0.1:3", "127.0.0.1:4"), sentinel_password="spw")
    env = endpoints.as_env()
    assert env["DARKROOM_REDIS_SENTINELS"] == "127.0.0.1:3,127.0.0.1:4"
    assert env["DARKROOM_REDIS_SENTINEL_PASSWORD"] == "spw" and env["DARKROOM_REDIS_MASTER_NAME"] == "darkroom"
    assert "spw" not in repr(endpoints) and "pw@" not in repr(endpoints)
    assert type(services_for(tmp_path)) is EmbeddedServices
    assert isinstance(services_for(tmp_path, ha=True), HAServices)
    (tmp_path / "ha.json").write_text("{}")
    assert isinstance(services_for(tmp_path), HAServices)  # a folder brought up with --ha stays HA


def test_a_wrong_password_is_not_turned_into_a_retryable_error() -> None:
    with pytest.raises(redis.exceptions.AuthenticationError), _durable.redis_unavailable("submit the jobs"):
        raise redis.exceptions.AuthenticationError("invalid username-password pair")


def test_the_cli_explains_redis_unavailable_by_what_redis_said() -> None:
    from darkroom.common.cli_errors import ExitCode, explain

    wrapped = RedisUnavailable("Redis is unavailable or failing over")
    wrapped.__cause__ = redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    failure = explain(wrapped)
    assert failure is not None and failure.exit_code == ExitCode.UNAVAILABLE and "cannot reach Redis" in failure.message
    lonely = explain(NotReplicated("0 of the 1 replica(s)", [], [], wanted=1, confirmed=0))
    assert lonely is not None and lonely.exit_code == ExitCode.FAILED
