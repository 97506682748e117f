"""Embedded Redis high availability: a primary, one replica and three Sentinels, for tests and laptops.

``darkroom services up --ha`` runs what :mod:`.embedded` runs (Redis and a SeaweedFS S3 server) and adds,
from the same ``redis-server`` binary (Redis >= 6.2)::

    redis (primary)      the embedded Redis; after a failover, a replica of the new primary when it restarts
    redis-replica        replicaof the primary, same password (requirepass and masterauth)
    sentinel-1..3        redis-server sentinel.conf --sentinel, quorum 2, each with its own password

Under the state folder: ``ha.json`` (ports, pids, the Sentinels' password; mode 0600), ``redis-replica/``,
``sentinel-N/sentinel.conf`` (the Sentinels rewrite it: it holds who the primary is now, so a restarted
Sentinel keeps that knowledge) and ``logs/redis-replica.log``, ``logs/sentinel-N.log``. ``services.env``
gains ``DARKROOM_REDIS_SENTINELS``, ``DARKROOM_REDIS_MASTER_NAME`` and ``DARKROOM_REDIS_SENTINEL_PASSWORD``:
every client then follows failovers (see :mod:`darkroom.common.clients`).

A state folder brought up with ``--ha`` stays HA: ``down`` stops all seven processes, a later ``up`` starts
them again; a data node that died after a failover comes back as a replica of the current primary.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .embedded import (
    _HOST,
    EmbeddedServices,
    EmbeddedServicesError,
    Endpoints,
    _pick_port,
    _port_free,
    _Proc,
    _State,
    _tail,
    _write_private,
)

__all__ = ["DEFAULT_MASTER_NAME", "HAEndpoints", "HAServices", "services_for"]

DEFAULT_MASTER_NAME = "darkroom"
SENTINELS = 3
QUORUM = 2
_POLL_S = 0.05


@dataclass(frozen=True)
class HAEndpoints(Endpoints):
    """Endpoints of the HA topology: the Sentinels to ask for the primary, and their password."""

    sentinels: tuple[str, ...] = ()
    master_name: str = DEFAULT_MASTER_NAME
    sentinel_password: str = ""

    def as_env(self) -> dict[str, str]:
        return {
            **super().as_env(),
            "DARKROOM_REDIS_SENTINELS": ",".join(self.sentinels),
            "DARKROOM_REDIS_MASTER_NAME": self.master_name,
            "DARKROOM_REDIS_SENTINEL_PASSWORD": self.sentinel_password,
        }

    def redacted(self) -> dict[str, str]:
        return {**super().redacted(), "DARKROOM_REDIS_SENTINEL_PASSWORD": "***"}

    def __repr__(self) -> str:
        return f"HAEndpoints({self.redacted()!r})"


@dataclass
class _HAState:
    sentinel_password: str
    master_name: str = DEFAULT_MASTER_NAME
    replica_port: int | None = None
    sentinel_ports: list[int] = field(default_factory=list)
    replica_proc: _Proc | None = None
    sentinel_procs: list[_Proc | None] = field(default_factory=list)
    primary_node: str = "redis"  # which data node was primary when last seen: "redis" or "replica"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _HAState:
        return cls(
            sentinel_password=str(data["sentinel_password"]),
            master_name=str(data.get("master_name") or DEFAULT_MASTER_NAME),
            replica_port=data.get("replica_port"),
            sentinel_ports=[int(p) for p in data.get("sentinel_ports") or []],
            replica_proc=_Proc(**data["replica_proc"]) if data.get("replica_proc") else None,
            sentinel_procs=[_Proc(**p) if p else None for p in data.get("sentinel_procs") or []],
            primary_node="replica" if data.get("primary_node") == "replica" else "redis",
        )

    def sentinel_addresses(self) -> tuple[str, ...]:
        return tuple(f"{_HOST}:{port}" for port in self.sentinel_ports)


class HAServices(EmbeddedServices):
    """:class:`EmbeddedServices` plus a replica and three Sentinels (see the module docstring).

    ``down_after_ms`` and ``failover_timeout_ms`` are the Sentinels' ``down-after-milliseconds`` (how long a
    silent primary takes to be declared down) and ``failover-timeout``; tests make them short.
    """

    def __init__(self, state_dir: Path, *, down_after_ms: int = 5000, failover_timeout_ms: int = 60_000,
                 master_name: str = DEFAULT_MASTER_NAME, **kwargs: Any) -> None:
        super().__init__(state_dir, **kwargs)
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.master_name = master_name

    @property
    def ha_file(self) -> Path:
        return self.state_dir / "ha.json"

    def log_of(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    # -- public API --------------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> HAEndpoints:
        """Start whatever is not running (Redis and S3 first, then the replica, then the Sentinels) and wait
        until the Sentinels agree on a primary and it has a replica in sync."""
        deadline = time.monotonic() + timeout
        base = super().up(timeout)
        with self._locked():
            state, ha = self._require_state(), self._load_ha()
            self._save_ha(ha)
            if not self._answers(ha.replica_proc, ha.replica_port, state.redis_password):
                self._launch_replica(state, ha)
            self._await_ping(ha.replica_proc, ha.replica_port, state.redis_password, "redis-replica", deadline)
            for index in range(SENTINELS):
                proc = ha.sentinel_procs[index] if index < len(ha.sentinel_procs) else None
                port = ha.sentinel_ports[index] if index < len(ha.sentinel_ports) else None
                if not self._answers(proc, port, ha.sentinel_password):
                    self._launch_sentinel(state, ha, index)
            self._await_topology(state, ha, deadline)
            self._remember_primary(state, ha)
            endpoints = HAEndpoints(**vars(base), sentinels=ha.sentinel_addresses(), master_name=ha.master_name,
                                    sentinel_password=ha.sentinel_password)
            _write_private(self.env_file, "".join(f"{k}={v}\n" for k, v in endpoints.as_env().items()))
            return endpoints

    def down(self, timeout: float = 15.0) -> None:
        """Stop the Sentinels first (no failover while stopping), then the replica, Redis and S3."""
        if self.ha_file.exists():
            with self._locked():
                ha = self._load_ha()
                state = self._load_state()
                if state is not None:
                    self._remember_primary(state, ha)  # the next up() starts the same node as primary
                self._stop([p for p in (*ha.sentinel_procs, ha.replica_proc) if p is not None], timeout)
                ha.sentinel_procs, ha.replica_proc = [], None
                self._save_ha(ha)
        super().down(timeout)

    def status(self) -> dict[str, object]:
        """The base status plus ``redis-replica`` and ``sentinel-1..3`` (each with ``running``, ``pid``...)."""
        status = super().status()
        ha = self._load_ha()
        status["redis-replica"] = self._service_status(
            ha.replica_proc, ha.replica_port, f"redis://{_HOST}:{ha.replica_port}" if ha.replica_port else None,
            self.log_of("redis-replica"))
        for index in range(SENTINELS):
            port = ha.sentinel_ports[index] if index < len(ha.sentinel_ports) else None
            proc = ha.sentinel_procs[index] if index < len(ha.sentinel_procs) else None
            status[f"sentinel-{index + 1}"] = self._service_status(
                proc, port, f"sentinel://{_HOST}:{port}" if port else None, self.log_of(f"sentinel-{index + 1}"))
        return status

    def topology(self) -> dict[str, Any]:
        """Who is primary now (as the Sentinels say) and each data node's role: ``{"master_name", "primary",
        "nodes": {port: role}}``; roles are ``master``, ``slave`` or ``down``."""
        state, ha = self._load_state(), self._load_ha()
        password = state.redis_password if state else ""
        primary = self.primary(ha)
        nodes = {}
        for port in (state.redis_port if state else None, ha.replica_port):
            if port is not None:
                nodes[f"{_HOST}:{port}"] = _role(port, password)
        return {"master_name": ha.master_name, "primary": primary, "nodes": nodes}

    def primary(self, ha: _HAState | None = None) -> str | None:
        """``host:port`` of the primary as the first Sentinel that answers says, None if none answers."""
        ha = ha or self._load_ha()
        for port in ha.sentinel_ports:
            address = _ask_master(port, ha.sentinel_password, ha.master_name)
            if address is not None:
                return f"{address[0]}:{address[1]}"
        return None

    def _current_primary(self, state: _State, ha: _HAState) -> str:
        """``host:port`` of the primary: what the Sentinels say, else the node that was primary when last seen
        (after ``down``, or a failover, that may be the replica node: it holds the newest data)."""
        found = self.primary(ha)
        if found is not None:
            return found
        port = ha.replica_port if ha.primary_node == "replica" and ha.replica_port else state.redis_port
        return f"{_HOST}:{port}"

    def _remember_primary(self, state: _State, ha: _HAState) -> None:
        found = self.primary(ha)
        if found is not None:
            ha.primary_node = "replica" if found == f"{_HOST}:{ha.replica_port}" else "redis"
            self._save_ha(ha)

    # -- state -------------------------------------------------------------------------------

    def _load_ha(self) -> _HAState:
        try:
            return _HAState.from_json(json.loads(self.ha_file.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return _HAState(sentinel_password=secrets.token_urlsafe(24), master_name=self.master_name)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddedServicesError(f"{self.ha_file} is unreadable ({exc}); run down and delete it") from exc

    def _save_ha(self, ha: _HAState) -> None:
        _write_private(self.ha_file, json.dumps(asdict(ha), indent=2) + "\n")

    def _require_state(self) -> _State:
        state = self._load_state()
        if state is None or state.redis_port is None:
            raise EmbeddedServicesError("Redis was not started: no port recorded")
        return state

    def _taken_ports(self, state: _State, ha: _HAState) -> set[int]:
        ports = {*state.weed_ports.values(), *ha.sentinel_ports}
        return ports | {p for p in (state.redis_port, ha.replica_port) if p is not None}

    # -- data nodes --------------------------------------------------------------------------

    def _redis_conf(self, state: _State, data_dir: Path) -> str:
        """The primary's configuration; once a failover made another node primary, it restarts as its replica."""
        conf = super()._redis_conf(state, data_dir) + f"masterauth {state.redis_password}\n"
        current = self._current_primary(state, self._load_ha()) if self.ha_file.exists() else None
        if current is not None and current != f"{_HOST}:{state.redis_port}":
            conf += "replicaof {} {}\n".format(*current.rsplit(":", 1))
        return conf

    def _launch_replica(self, state: _State, ha: _HAState) -> None:
        if ha.replica_proc is not None:
            self._stop([ha.replica_proc], timeout=10.0)
        if ha.replica_port is None or not _port_free(ha.replica_port):
            ha.replica_port = _pick_port(self._taken_ports(state, ha), grpc=False)
        data_dir = self.state_dir / "redis-replica"
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        replica_state = _State(**{**asdict(state), "redis_port": ha.replica_port, "redis_proc": None,
                                  "weed_proc": None})
        conf = EmbeddedServices._redis_conf(self, replica_state, data_dir) + f"masterauth {state.redis_password}\n"
        current = self._current_primary(state, ha)
        if current != f"{_HOST}:{ha.replica_port}":
            conf += "replicaof {} {}\n".format(*current.rsplit(":", 1))
        _write_private(data_dir / "redis.conf", conf)
        ha.replica_proc = self._spawn([self._redis_binary(), str(data_dir / "redis.conf")],
                                      self.log_of("redis-replica"), {}, "redis-server (replica)")
        self._save_ha(ha)

    # -- sentinels ---------------------------------------------------------------------------

    def _launch_sentinel(self, state: _State, ha: _HAState, index: int) -> None:
        while len(ha.sentinel_ports) <= index:
            ha.sentinel_ports.append(_pick_port(self._taken_ports(state, ha), grpc=False))
        while len(ha.sentinel_procs) <= index:
            ha.sentinel_procs.append(None)
        if ha.sentinel_procs[index] is not None:
            self._stop([p for p in [ha.sentinel_procs[index]] if p is not None], timeout=10.0)
        if not _port_free(ha.sentinel_ports[index]):
            ha.sentinel_ports[index] = _pick_port(self._taken_ports(state, ha), grpc=False)
        folder = self.state_dir / f"sentinel-{index + 1}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"
        # A Sentinel rewrites its file with what it learnt (the current primary, its peers): keep it on restart,
        # with this run's port. A new one monitors whoever the others say is primary.
        if conf.exists():
            text = "".join(line + "\n" for line in conf.read_text().splitlines() if not line.startswith("port "))
            _write_private(conf, f"port {ha.sentinel_ports[index]}\n" + text)
        else:
            _write_private(conf, self._sentinel_conf(state, ha, index, folder))
        ha.sentinel_procs[index] = self._spawn([self._redis_binary(), str(conf), "--sentinel"],
                                               self.log_of(f"sentinel-{index + 1}"), {}, "redis-server --sentinel")
        self._save_ha(ha)

    def _sentinel_conf(self, state: _State, ha: _HAState, index: int, folder: Path) -> str:
        host, port = self._current_primary(state, ha).rsplit(":", 1)
        name = ha.master_name
        lines = [
            f"port {ha.sentinel_ports[index]}",
            f"bind {_HOST}",
            "daemonize no",
            'logfile ""',
            f"dir {json.dumps(str(folder), ensure_ascii=False)}",
            f"requirepass {ha.sentinel_password}",
            f"sentinel sentinel-pass {ha.sentinel_password}",  # to talk to its peers, which require it too
            f"sentinel monitor {name} {host} {port} {QUORUM}",
            f"sentinel auth-pass {name} {state.redis_password}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        return "".join(line + "\n" for line in lines)

    # -- readiness ---------------------------------------------------------------------------

    def _answers(self, proc: _Proc | None, port: int | None, password: str) -> bool:
        return self._alive(proc) and port is not None and _ping(port, password)

    def _await_ping(self, proc: _Proc | None, port: int | None, password: str, what: str, deadline: float) -> None:
        while not (port is not None and _ping(port, password)):
            if not self._alive(proc):
                log = self.log_of(what)
                raise EmbeddedServicesError(f"{what} exited during start-up; last lines of {log}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise EmbeddedServicesError(f"{what} not answering on port {port} in time; see {self.log_of(what)}")
            time.sleep(_POLL_S)

    def _await_topology(self, state: _State, ha: _HAState, deadline: float) -> None:
        """Until every Sentinel answers, names the same primary, knows its peers and the primary has an
        in-sync replica."""
        while True:
            problem = self._topology_problem(state, ha)
            if problem is None:
                return
            for index, proc in enumerate(ha.sentinel_procs):
                if not self._alive(proc):
                    log = self.log_of(f"sentinel-{index + 1}")
                    raise EmbeddedServicesError(f"sentinel-{index + 1} exited; last lines of {log}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise EmbeddedServicesError(f"Redis HA topology not ready in time: {problem}")
            time.sleep(_POLL_S)

    def _topology_problem(self, state: _State, ha: _HAState) -> str | None:
        answers = {_ask_master(port, ha.sentinel_password, ha.master_name) for port in ha.sentinel_ports}
        if None in answers or len(answers) != 1:
            return f"the Sentinels do not agree on a primary yet ({answers})"
        host, port = next(iter(answers))  # type: ignore[misc]
        info = _info(int(port), state.redis_password, "replication")
        if info.get("role") != "master" or not any(
            key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
            for key, value in info.items()
        ):
            return f"primary {host}:{port} has no replica in sync yet"
        peers = _sentinel_peers(ha.sentinel_ports[0], ha.sentinel_password, ha.master_name)
        if peers < SENTINELS - 1:
            return f"sentinel-1 knows {peers} of its {SENTINELS - 1} peers"
        return None


def services_for(state_dir: Path, *, ha: bool = False, **kwargs: Any) -> EmbeddedServices:
    """The embedded services of ``state_dir``: HA when asked, or when the folder was brought up with ``--ha``."""
    if ha or (Path(state_dir) / "ha.json").exists():
        return HAServices(state_dir, **kwargs)
    return EmbeddedServices(state_dir, **kwargs)


# -- small Redis helpers (lazy imports: redis-py costs ~0.1 s to import) -------------------------


def _client(port: int, password: str) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(host=_HOST, port=port, password=password or None, socket_connect_timeout=0.5,
                       socket_timeout=1.0, retry=Retry(NoBackoff(), 0), decode_responses=True)


def _ping(port: int, password: str) -> bool:
    client = _client(port, password)
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not answering (yet)
        return False
    finally:
        client.close()


def _ask_master(port: int, password: str, name: str) -> tuple[str, int] | None:
    client = _client(port, password)
    try:
        reply = client.execute_command("SENTINEL", "get-master-addr-by-name", name)
    except Exception:  # noqa: BLE001 - this Sentinel is down: ask the next
        return None
    finally:
        client.close()
    return (str(reply[0]), int(reply[1])) if reply else None


def _sentinel_peers(port: int, password: str, name: str) -> int:
    client = _client(port, password)
    try:
        return len(client.execute_command("SENTINEL", "sentinels", name) or [])
    except Exception:  # noqa: BLE001 - not ready
        return 0
    finally:
        client.close()


def _info(port: int, password: str, section: str) -> dict[str, Any]:
    client = _client(port, password)
    try:
        return dict(client.info(section))
    except Exception:  # noqa: BLE001 - down
        return {}
    finally:
        client.close()


def _role(port: int, password: str) -> str:
    return str(_info(port, password, "replication").get("role") or "down")
