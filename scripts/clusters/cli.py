#!/usr/bin/env python3
"""./scripts/cluster: real clustered MQTT brokers on free loopback ports, for failover work and tests.

Standard library only (system Python >= 3.10), so it runs before any venv exists.
This file parses the command line, keeps DIR/state.json, tells which processes
are alive and prints the result; the backends (aedes.py, bridge.py, rabbitmq.py
beside it) start and stop the brokers with the small process and MQTT helpers
defined here. Every process listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the backends `import cli`: let them share this module instead of loading a copy
    sys.modules.setdefault("cli", sys.modules[__name__])

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEFAULT_DIR = ROOT / ".cluster"
KINDS = ("aedes", "bridge", "rabbitmq")
HOST = "127.0.0.1"  # the only address anything here listens on or connects to
START_TIMEOUT_S = float(os.environ.get("EDGEPRUNE_CLUSTER_TIMEOUT_S", "60"))


class ClusterError(Exception):
    """An expected failure: printed as one line (or a JSON error object), exit status 1."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- helpers shared by the backends


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open together, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def spawn(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start a daemon: its own session (a Ctrl-C in the caller's terminal does not reach it), output appended
    to ``log``, no inherited pipes (a caller capturing our output is not kept waiting for EOF)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )


def process(proc: subprocess.Popen, **fields) -> dict:
    """The state.json entry of a started process: its pid plus the kernel's start time of that pid, so that a
    later pid check (or kill) never mistakes an unrelated process that reused the pid for ours."""
    return {**fields, "pid": proc.pid, "_start": _starttime(proc.pid)}


def _starttime(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # a zombie is dead: killed, not yet reaped by its new parent
        return None
    return int(fields[19])


def alive(entry: dict) -> bool:
    """Whether the process of a state entry ({"pid": N, "_start": T}) still runs."""
    pid = entry.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    start = _starttime(pid)
    if start is None:
        return False
    return entry.get("_start") is None or entry["_start"] == start


def _wait_dead(entries: list[dict], timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = [e for e in entries if alive(e)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _signal(entry: dict, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(entry["pid"], sig)


def kill9(entry: dict) -> None:
    """SIGKILL one process and wait until it is gone."""
    if alive(entry):
        _signal(entry, signal.SIGKILL)
        if _wait_dead([entry], 10):
            raise ClusterError("kill_failed", f"pid {entry['pid']} survived SIGKILL")


def terminate(entries: list[dict], timeout_s: float = 5.0) -> None:
    """SIGTERM (a clean shutdown: brokers close their clients and stores), then SIGKILL whatever is left."""
    running = [e for e in entries if alive(e)]
    for e in running:
        _signal(e, signal.SIGTERM)
    for e in _wait_dead(running, timeout_s):
        kill9(e)


def log_tail(log: Path, lines: int = 15) -> str:
    """The last lines a process wrote to its log since spawn() started it (logs are appended to across runs)."""
    try:
        text = log.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    starts = [i for i, line in enumerate(text) if line.startswith("--- ")]
    text = text[starts[-1] + 1 :] if starts else text
    return " | ".join(text[-lines:]) or "(nothing logged)"


def wait_ready(name: str, proc: subprocess.Popen, log: Path, ready, deadline: float) -> None:
    """Poll ``ready()`` until it is true; fail at once if the process exits, or at ``deadline`` (monotonic),
    with the tail of its log in the message."""
    while True:
        if proc.poll() is not None:
            raise ClusterError(
                "start_failed",
                f"{name} exited with status {proc.returncode} while starting " f"(log {log}): {log_tail(log)}",
            )
        if ready():
            return
        if time.monotonic() >= deadline:
            raise ClusterError(
                "start_timeout", f"{name} was not ready after {START_TIMEOUT_S:g} s " f"(log {log}): {log_tail(log)}"
            )
        time.sleep(0.1)


def _mqtt_str(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def _mqtt_len(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + _mqtt_len(len(body)) + body


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """One MQTT packet: (first byte, body). Raises OSError on EOF or timeout."""

    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed")
            buf += chunk
        return buf

    first = exact(1)[0]
    length, shift = 0, 0
    while True:
        digit = exact(1)[0]
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            return first, exact(length)


def mqtt_connect(
    port: int, username: str | None = None, password: str | None = None, timeout_s: float = 2.0
) -> tuple[socket.socket, int]:
    """A raw MQTT 3.1.1 CONNECT (clean session) to 127.0.0.1:port: (socket, CONNACK return code).
    Raw bytes because the system Python that runs this tool may have no paho."""
    client_id = f"edgeprune-cluster-probe-{os.getpid()}-{time.monotonic_ns() % 10**9}".encode()
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    payload = _mqtt_str(client_id)
    for field in (username, password):
        if field is not None:
            payload += _mqtt_str(field.encode())
    sock = socket.create_connection((HOST, port), timeout=timeout_s)
    try:
        sock.sendall(mqtt_packet(0x10, _mqtt_str(b"MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + payload))
        first, body = read_packet(sock)
        if first != 0x20 or len(body) != 2:
            raise ConnectionError(f"not a CONNACK: {first:#x}")
        return sock, body[1]
    except BaseException:
        sock.close()
        raise


def mqtt_ready(port: int, username: str | None = None, password: str | None = None) -> bool:
    """True when the broker on 127.0.0.1:port completes a CONNECT/CONNACK handshake and accepts us."""
    try:
        sock, code = mqtt_connect(port, username, password)
    except OSError:
        return False
    with sock:
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT: no Will, no "connection lost" noise in the broker log
    return code == 0


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def node_entry(state: dict, name: str) -> dict:
    for node in state["nodes"]:
        if node["name"] == name:
            return node
    raise ClusterError(
        "unknown_node", f"no node {name!r} in this cluster (nodes: " f"{', '.join(n['name'] for n in state['nodes'])})"
    )


# ---------------------------------------------------------------- backends, state, liveness


def load_backend(kind: str):
    """The backend module scripts/clusters/KIND.py (loaded by path: the aedes/ folder beside aedes.py
    would shadow a plain import)."""
    path = HERE / f"{kind}.py"
    if not path.exists():
        raise ClusterError("backend_missing", f"the {kind} backend ({path.relative_to(ROOT)}) is not in this checkout")
    spec = importlib.util.spec_from_file_location(f"edgeprune_cluster_{kind}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unavailable(kind: str) -> str | None:
    """Why a backend cannot start here (a missing program or package), or None."""
    try:
        backend = load_backend(kind)
    except ClusterError as e:
        return str(e)
    check = getattr(backend, "unavailable", None)
    if check is not None:
        return check()
    if kind == "rabbitmq" and not any(Path(p).exists() for p in ("/usr/sbin/rabbitmq-server", "/usr/lib/rabbitmq")):
        return "rabbitmq-server is not installed (./scripts/test installs it with apt)"
    return None


def _is_pid(key: str, value) -> bool:
    return (key == "pid" or key.endswith("_pid")) and type(value) is int and value > 0


def processes(state: dict) -> list[dict]:
    """Every process anywhere in a state, as {"pid", "_start"}: each "pid" or "..._pid" value (nodes, redis,
    whatever a backend added, such as a wrapper's or epmd's pid)."""
    starts, found = state.get("_starts", {}), {}

    def walk(value):
        if isinstance(value, dict):
            for key, v in value.items():
                if _is_pid(key, v):
                    found.setdefault(
                        v, {"pid": v, "_start": value.get("_start") if key == "pid" else starts.get(str(v))}
                    )
                else:
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(state)
    return list(found.values())


def stamp_start_times(state: dict) -> dict:
    """Record the start time of every pid a backend did not stamp itself (see process()): a "pid" in its
    entry's "_start", a "..._pid" in the state's "_starts"."""
    starts = state.setdefault("_starts", {})

    def walk(value):
        if isinstance(value, dict):
            for key, v in list(value.items()):
                if key == "pid" and _is_pid(key, v) and "_start" not in value:
                    value["_start"] = _starttime(v)
                elif key != "pid" and _is_pid(key, v) and str(v) not in starts:
                    starts[str(v)] = _starttime(v)
                else:
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(state)
    return state


def state_path(dir: Path) -> Path:
    return dir / "state.json"


def read_state(dir: Path) -> dict | None:
    try:
        return json.loads(state_path(dir).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClusterError("bad_state", f"cannot read {state_path(dir)}: {e}") from None


def write_state(dir: Path, state: dict) -> None:
    tmp = state_path(dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp_start_times(state), indent=2) + "\n")
    tmp.replace(state_path(dir))


@contextlib.contextmanager
def locked(dir: Path, create: bool = False):
    """One command at a time per DIR (two concurrent starts would both find it free). Only start creates DIR."""
    if create:
        dir.mkdir(parents=True, exist_ok=True)
    elif not dir.is_dir():
        yield
        return
    with open(dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def public(state):
    """A state as shown to users: `alive` added to each process, private keys (leading _) left out."""
    if isinstance(state, dict):
        out = {k: public(v) for k, v in state.items() if not k.startswith("_")}
        if isinstance(state.get("pid"), int):
            out["alive"] = alive(state)
        return out
    if isinstance(state, list):
        return [public(v) for v in state]
    return state


def running(state: dict | None) -> bool:
    return bool(state) and any(alive(e) for e in processes(state))


# ---------------------------------------------------------------- commands


def cmd_start(args) -> dict:
    with locked(args.dir, create=True):
        old = read_state(args.dir)
        if running(old):
            if not args.force:
                raise ClusterError(
                    "already_running",
                    f"a cluster ({old.get('kind')}) is already running in {args.dir} "
                    f"(./scripts/cluster stop --dir {args.dir}, or start --force)",
                )
            _stop(old)
        state_path(args.dir).unlink(missing_ok=True)
        why = unavailable(args.kind)
        if why:
            raise ClusterError("unavailable", f"cannot start a {args.kind} cluster: {why}")
        backend = load_backend(args.kind)
        t0 = time.monotonic()
        state = backend.start(args.dir, args.nodes)
        state["startup_s"] = round(time.monotonic() - t0, 2)
        write_state(args.dir, state)
        return public(state)


def _stop(state: dict) -> list[int]:
    """The backend's clean stop, then SIGKILL for any process of the state it left behind."""
    entries = [e for e in processes(state) if alive(e)]
    try:
        load_backend(state["kind"]).stop(state)
    except Exception:  # a backend that cannot stop cleanly (or is gone) must not leave its processes running
        pass
    terminate(entries, timeout_s=3)
    return [e["pid"] for e in entries]


def cmd_stop(args) -> dict:
    with locked(args.dir):
        state = read_state(args.dir)
        stopped = _stop(state) if state else []
        state_path(args.dir).unlink(missing_ok=True)
        return {"kind": state and state.get("kind"), "dir": str(args.dir), "stopped_pids": stopped}


def _current(dir: Path) -> dict:
    state = read_state(dir)
    if state is None:
        raise ClusterError("no_cluster", f"no cluster in {dir} (./scripts/cluster start --dir {dir})")
    return state


def cmd_status(args) -> dict:
    with locked(args.dir):
        return public(_current(args.dir))


def cmd_kill(args) -> dict:
    with locked(args.dir):
        state = _current(args.dir)
        node = node_entry(state, args.node)
        if not alive(node):
            raise ClusterError("not_running", f"node {args.node} is not running")
        load_backend(state["kind"]).kill(state, args.node)
        kill9(node)  # whatever the backend did, the node is dead when this returns
        write_state(args.dir, state)
        return public(state)


def cmd_restart(args) -> dict:
    with locked(args.dir):
        state = _current(args.dir)
        if alive(node_entry(state, args.node)):
            raise ClusterError("node_running", f"node {args.node} is running (kill it first)")
        state = load_backend(state["kind"]).restart(state, args.node)
        write_state(args.dir, state)
        return public(state)


def cmd_check(args) -> dict:
    why = unavailable(args.kind)
    if why:
        raise ClusterError("unavailable", f"{args.kind}: {why}")
    return {"kind": args.kind, "available": True}


def render(command: str, result: dict) -> str:
    """The short human form of a result."""
    if command == "stop":
        pids = result["stopped_pids"]
        return f"stopped {len(pids)} process(es) in {result['dir']}" if pids else f"nothing running in {result['dir']}"
    if command == "check":
        return f"{result['kind']}: available"
    lines = [
        f"{result['kind']} cluster in {result['dir']}"
        + (f" (started in {result['startup_s']} s)" if "startup_s" in result and command == "start" else "")
    ]
    rows = [("NODE", "URL", "PID", "ALIVE")]
    rows += [(n["name"], n["url"], str(n["pid"]), "yes" if n["alive"] else "DEAD") for n in result["nodes"]]
    for key, value in result.items():
        if key != "nodes" and isinstance(value, dict) and "pid" in value:
            rows.append((key, str(value.get("url", "")), str(value["pid"]), "yes" if value["alive"] else "DEAD"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if result.get("username") is not None:
        lines.append(f"credentials: {result['username']} / {result['password']}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 2, as a JSON error object on stdout when --json was given."""

    def error(self, message):
        if "--json" in sys.argv[1:]:
            print(json.dumps({"error": {"code": "usage", "message": f"{message} (see {self.prog} --help)"}}))
            sys.exit(2)
        super().error(message)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="where state.json and the logs (NODE.log) live (default: %(default)s)",
    )
    common.add_argument("--json", action="store_true", help='print one JSON object (errors too: {"error": ...})')
    p = _Parser(
        prog="scripts/cluster",
        description="Real clustered MQTT brokers on free 127.0.0.1 ports, daemonized, for failover tests. "
        "Nodes are named A, B, C, ...; their pids and URLs are kept in DIR/state.json.",
        epilog="kinds: aedes = N Aedes (Node.js) nodes sharing one Redis; bridge = two Mosquitto brokers, "
        "B (site) bridging edgeprune/# to A (laptop); rabbitmq = a RabbitMQ cluster with its MQTT plugin.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser(
        "start",
        parents=[common],
        help="start a cluster; returns once every node accepts MQTT",
        description="Start a cluster and wait (at most EDGEPRUNE_CLUSTER_TIMEOUT_S, default 60 s) "
        "until every node answers an MQTT CONNECT.",
    )
    s.add_argument("--kind", choices=KINDS, default="aedes", help="default: %(default)s")
    s.add_argument("--nodes", type=int, default=None, help="number of nodes (default 3; bridge: exactly 2)")
    s.add_argument("--force", action="store_true", help="stop a cluster already running in DIR first")
    sub.add_parser(
        "stop",
        parents=[common],
        help="stop every process of the cluster (idempotent)",
        description="Stop every process listed in DIR/state.json (nodes, Redis, ...). "
        "Nothing running is not an error.",
    )
    sub.add_parser(
        "status",
        parents=[common],
        help="show nodes, URLs, pids and which are alive",
        description="Show the cluster in DIR with each process's liveness (exit 1: no cluster).",
    )
    k = sub.add_parser(
        "kill",
        parents=[common],
        help="SIGKILL one node (e.g. A), to test failover",
        description="SIGKILL one node: no clean shutdown, its clients see the connection drop.",
    )
    k.add_argument("node", metavar="NODE")
    r = sub.add_parser(
        "restart",
        parents=[common],
        help="start a killed node again on the same port",
        description="Start a killed node again on the same port; returns once it accepts MQTT.",
    )
    r.add_argument("node", metavar="NODE")
    c = sub.add_parser("check", parents=[common], help="say whether a kind can start here (exit 1 if not, and why)")
    c.add_argument("--kind", choices=KINDS, default="aedes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.dir = args.dir.expanduser().resolve()
    if args.command == "start":
        if args.nodes is None:
            args.nodes = 2 if args.kind == "bridge" else 3
        if not 1 <= args.nodes <= 26:
            parser().error("--nodes must be between 1 and 26")
    commands = {
        "start": cmd_start,
        "stop": cmd_stop,
        "status": cmd_status,
        "kill": cmd_kill,
        "restart": cmd_restart,
        "check": cmd_check,
    }
    try:
        result = commands[args.command](args)
    except ClusterError as e:
        return _fail(args, e.code, str(e))
    except KeyboardInterrupt:
        return _fail(args, "interrupted", "interrupted")
    except Exception as e:  # a backend's own exception (e.g. rabbitmq.py's): still one line, with its code if any
        return _fail(args, str(getattr(e, "code", None) or type(e).__name__), str(e) or repr(e))
    print(json.dumps(result) if args.json else render(args.command, result))
    return 0


def _fail(args, code: str, message: str) -> int:
    message = " ".join(message.split())
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message}}))
    else:
        print(f"scripts/cluster {args.command}: {message}", file=sys.stderr)
    return 2 if code == "usage" else 1


if __name__ == "__main__":
    sys.exit(main())
