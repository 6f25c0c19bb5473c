"""A local RabbitMQ 3.10 cluster speaking MQTT, for edgeprune's broker failover tests.

Everything listens on 127.0.0.1 only and every file lives under the cluster's
directory, so several clusters (and a system RabbitMQ, if any) can coexist and
nothing needs root except installing the Debian package the first time.

Processes started (each in its own session, so they outlive the caller;
:func:`stop` ends them all):

* one ``epmd`` (Erlang port mapper) on a private loopback port
  (``ERL_EPMD_PORT``), through which the nodes and rabbitmqctl find each other.
  Private, it never meets a system epmd on 4369, node names can repeat across
  clusters, and stop() may kill it without asking whom else it serves.
* per node, ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (a ``/bin/sh`` wrapper)
  and its ``beam.smp`` child with the VM's helpers ``erl_child_setup`` and
  ``inet_gethost``.  The package's ``/usr/sbin`` scripts are not used: as root
  they ``su`` to the ``rabbitmq`` user and ``cd /var/lib/rabbitmq``.  The node
  logs to its console, which goes to ``DIR/<name>.log``.
* short-lived ``rabbitmqctl`` runs; each is an Erlang node listening for a
  moment on one of 35672-35682 (loopback, see below).

Per node the environment sets (see :func:`_node_env`):

* ``RABBITMQ_NODENAME=rabbit-<x>@localhost``: short names on host
  ``localhost``, which resolves to 127.0.0.1 everywhere.
* ``RABBITMQ_NODE_IP_ADDRESS/RABBITMQ_NODE_PORT`` (AMQP, unused by the MQTT
  plugin but always opened) and ``RABBITMQ_DIST_PORT`` (Erlang distribution,
  else AMQP + 20000): free ports below the ephemeral range (see
  :func:`_free_ports`), kept for restarts.
* ``-kernel inet_dist_use_interface {127,0,0,1}`` for the servers
  (``RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS``) and rabbitmqctl
  (``RABBITMQ_CTL_ERL_ARGS``), and ``ERL_EPMD_ADDRESS=127.0.0.1``: without
  them the distribution listeners bind every interface.
* ``HOME=DIR/home`` holding ``.erlang.cookie`` (0400), read by the servers
  and by rabbitmqctl alike (``RABBITMQ_ERLANG_COOKIE`` is deprecated in 3.10).
* ``RABBITMQ_MNESIA_BASE``, ``RABBITMQ_LOG_BASE``, ``RABBITMQ_CONFIG_FILE``,
  ``RABBITMQ_ADVANCED_CONFIG_FILE`` (absent), ``RABBITMQ_CONF_ENV_FILE``
  (empty, instead of /etc/rabbitmq's), ``RABBITMQ_ENABLED_PLUGINS_FILE``
  (``rabbitmq_mqtt`` only; management is slow to start) and
  ``RABBITMQ_PID_FILE`` (the beam pid), all under ``DIR/<name>/``.

``rabbitmq.conf`` binds the AMQP and MQTT listeners to 127.0.0.1, refuses
anonymous MQTT clients, pins the MQTT vhost and exchange to ``/`` and
``amq.topic``, and loads ``DIR/definitions.json`` at boot: the ``edgeprune``
user (random password) with all permissions on ``/``.  That saves rabbitmqctl
round trips, keeps the password off command lines, and means RabbitMQ creates
no ``guest`` user at all.

Clustering: all nodes boot at once, B, C, ... without the MQTT plugin (see
:func:`_join`); each of them is ``stop_app``-ed, then, one at a time,
``join_cluster rabbit-a@localhost``, MQTT enabled, ``start_app``.  A killed
node is restarted with the same environment and rejoins from its mnesia dir
(which needs another node of the cluster running: a node restarted while all
others are down waits for them and times out; see also
:func:`_start_local_mqtt_raft_member` for a 3.10 hang that restart() avoids).  start() wipes ``DIR/<name>/``
of an earlier, stopped cluster.  On 2 idle cores a 3-node start takes about
20 s, most of it the boot of A (its MQTT plugin alone waits 3-6 s for peers
before electing itself); a restart about 7-10 s.

RabbitMQ 3.10 MQTT behaviour seen with this setup: messages, wildcards and
Wills cross nodes; retained messages do not (each node keeps its own store,
served only to exact-topic subscribers on that node, and lost when the node is
SIGKILLed); 16 MiB QoS 1 publishes pass.

The state returned by :func:`start` is a JSON-able dict; :func:`stop`,
:func:`kill` and :func:`restart` take it back.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import string
import struct
import subprocess
import time

# --- constants ---------------------------------------------------------------

RABBITMQ_BIN = pathlib.Path("/usr/lib/rabbitmq/bin")  # the real scripts, not /usr/sbin's su wrappers
DEBIAN_PACKAGE = "rabbitmq-server"
SYSTEM_INIT_SCRIPT = "/etc/init.d/rabbitmq-server"
SYSTEM_PORTS = (5672, 25672)  # AMQP and distribution of the package's own node
EPMD_CANDIDATES = ("/usr/bin/epmd", "/usr/lib/erlang/bin/epmd")
LOOPBACK = "127.0.0.1"
PORT_RANGE = (20000, 32767)  # below Linux's default ephemeral range (32768-60999); see _free_ports
ERLANG_HOST = "localhost"  # host part of the short node names
NODE_NAMES = string.ascii_uppercase
USERNAME = "edgeprune"
PLUGINS = ("rabbitmq_mqtt",)
DIST_ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"

START_TIMEOUT = 90.0  # s, one node's boot (spawn .. listeners up) and one start_app
CLUSTER_TIMEOUT = 90.0  # s, until cluster_status and MQTT CONNECTs are right
CTL_TIMEOUT = 60.0  # s, one rabbitmqctl call
STOP_TIMEOUT = 30.0  # s, rabbitmqctl stop before SIGKILL
POLL = 0.1  # s
NUDGE_INTERVAL = 2.0  # s, between tries of _start_local_mqtt_raft_member during a restart
LOG_TAIL_LINES = 8
START_MARKER = "==== edgeprune: starting"  # written to DIR/<name>.log before each start
# rabbitmqctl eval on a restarting node: start its MQTT Raft member (see _start_local_mqtt_raft_member)
START_MQTT_RAFT_MEMBER_ERL = """
case ra_directory:uid_of(coordination, mqtt_node) of
    undefined -> not_a_member;
    _ -> case whereis(mqtt_node) of
             undefined -> ra:restart_server(coordination, {mqtt_node, node()});
             _ -> already_running
         end
end.
"""

# --- small helpers -------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports from PORT_RANGE, below the kernel's ephemeral range.

    Ports from binding port 0 come from the ephemeral range, where any later
    connect() or bind(0) on the machine may take them while a node is
    down, and restart() needs them again (seen: another test's broker got a
    killed node's distribution port).  Each candidate is bound on 0.0.0.0,
    as RabbitMQ's own pre-boot check does, so that a listener on any address
    counts; nothing listens and the sockets are held until all are picked.
    """
    socks, ports = [], []
    rng = secrets.SystemRandom()
    try:
        for _ in range(100 * count):
            if len(ports) == count:
                return ports
            port = rng.randint(*PORT_RANGE)
            if port in ports:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(port)
        raise RuntimeError(f"found only {len(ports)} of {count} free ports in {PORT_RANGE}")
    finally:
        for s in socks:
            s.close()


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: pathlib.Path) -> str:
    """Log lines for an error message: the first error of the last start attempt, then the log's end."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"({path} unreadable)"
    starts = [i for i, line in enumerate(lines) if line.startswith(START_MARKER)]
    lines = lines[starts[-1] + 1 if starts else 0 :]
    first_error = next((i for i, line in enumerate(lines) if "[error]" in line or "[critical]" in line), None)
    end = lines[-LOG_TAIL_LINES:]
    if first_error is not None and first_error < len(lines) - LOG_TAIL_LINES:
        end = [*lines[first_error : first_error + 3], "...", *end[LOG_TAIL_LINES // 2 :]]
    return "\n    ".join(end) or f"({path}: nothing logged yet)"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process, or None when it is gone."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    return fields[0], int(fields[1])


def _alive(pid: int | None) -> bool:
    """True while pid runs (a zombie counts as dead)."""
    if not pid:
        return False
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _reap(pid: int | None) -> None:
    """Collect pid's exit status if it is our child (no zombie left behind)."""
    if not pid:
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... (erl_child_setup, inet_gethost, ...)."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st:
                children.setdefault(st[1], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _environ_has(pid: int, key: str, value: str) -> bool:
    """True when the running process pid was started with key=value (guards against pid reuse)."""
    try:
        env = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{key}={value}".encode() in env


def _pids_with_env_prefix(key: str, prefix: str) -> list[int]:
    """Live processes whose environment has key=<prefix...> (those we can read)."""
    needle = f"\0{key}={prefix}".encode()
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = b"\0" + (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in env and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _sigkill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_dead(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in pids:
            _reap(pid)
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(POLL)
    return False


def _parallel(fn, items):
    """fn(item) for every item at once; results in order; the first error is raised."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


# --- MQTT probe ---------------------------------------------------------------


def _mqtt_string(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def mqtt_connack(port: int, username: str | None, password: str | None, timeout: float = 5.0) -> int:
    """Send an MQTT 3.1.1 CONNECT to 127.0.0.1:port and return the CONNACK return code.

    Raises OSError when the connection fails or closes before the CONNACK
    (RabbitMQ closes the socket on some refusals).
    """
    flags = 0x02  # clean session
    payload = _mqtt_string(f"edgeprune-probe-{secrets.token_hex(4)}")
    if username is not None:
        flags |= 0x80
        payload += _mqtt_string(username)
        if password is not None:
            flags |= 0x40
            payload += _mqtt_string(password)
    body = _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + payload
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)  # body < 128 bytes: one-byte length
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            if not chunk:
                raise OSError("connection closed before CONNACK")
            reply += chunk
        if reply[0] != 0x20 or reply[1] != 2:
            raise OSError(f"not a CONNACK: {reply!r}")
        if reply[3] == 0:
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        return reply[3]


# --- installation ---------------------------------------------------------------


def _installed() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and _epmd_binary() is not None


def _can_sudo() -> bool:
    return bool(shutil.which("sudo")) and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0


def _as_root(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return cmd
    if _can_sudo():
        return ["sudo", "-n", *cmd]
    raise RuntimeError(
        f"{DEBIAN_PACKAGE} is not installed and installing it needs root " f"(apt-get install {DEBIAN_PACKAGE})"
    )


def unavailable() -> str | None:
    """Why start() cannot work here, or None (a missing package that start() can install is fine)."""
    if _installed():
        return None
    if not shutil.which("apt-get"):
        return f"{DEBIAN_PACKAGE} is not installed and apt-get is not available"
    if os.geteuid() != 0 and not _can_sudo():
        return f"{DEBIAN_PACKAGE} is not installed and installing it needs root"
    return None


def ensure_installed() -> None:
    """Install the Debian package when missing; stop a system node its postinst may have started."""
    if _installed():
        return
    why = unavailable()
    if why:
        raise RuntimeError(why)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", DEBIAN_PACKAGE],
    ):
        done = subprocess.run(_as_root(cmd), env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    _stop_system_node()


def _stop_system_node() -> None:
    """Stop the system node the package's postinst starts where no policy-rc.d vetoes it.

    It would hold 5672/25672 on all interfaces.  Detected by those ports, not
    with rabbitmqctl, which would itself start an epmd on 0.0.0.0:4369.  That
    epmd is left alone: our nodes use a private one.
    """
    if pathlib.Path(SYSTEM_INIT_SCRIPT).exists() and any(_port_open(p) for p in SYSTEM_PORTS):
        subprocess.run(_as_root([SYSTEM_INIT_SCRIPT, "stop"]), capture_output=True, timeout=120)


def _epmd_binary() -> str | None:
    for candidate in EPMD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("epmd")


# --- per-node files and environment ---------------------------------------------


def _erlang_node(name: str) -> str:
    return f"rabbit-{name.lower()}@{ERLANG_HOST}"


def _node_dir(state: dict, node: dict) -> pathlib.Path:
    return pathlib.Path(state["dir"]) / node["name"]


def _home(state: dict) -> pathlib.Path:
    return pathlib.Path(state["dir"]) / "home"


def _base_env(state: dict) -> dict:
    """Environment shared by servers and rabbitmqctl: cookie HOME, private epmd, loopback distribution."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update(
        {
            "HOME": str(_home(state)),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ERL_EPMD_ADDRESS": LOOPBACK,
            "ERL_EPMD_PORT": str(state["epmd_port"]),
            "RABBITMQ_CTL_ERL_ARGS": DIST_ERL_ARGS,
        }
    )
    return env


def _node_env(state: dict, node: dict) -> dict:
    d = _node_dir(state, node)
    env = _base_env(state)
    env.update(
        {
            "RABBITMQ_NODENAME": node["erlang_node"],
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(node["amqp_port"]),
            "RABBITMQ_DIST_PORT": str(node["dist_port"]),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": DIST_ERL_ARGS,
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),  # absent on purpose
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),  # empty: skip /etc/rabbitmq's
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / "beam.pid"),
            "ERL_CRASH_DUMP": str(d / "erl_crash.dump"),
        }
    )
    return env


def _write_node_files(state: dict, node: dict) -> None:
    d = _node_dir(state, node)
    (d / "log").mkdir(parents=True, exist_ok=True)
    (d / "rabbitmq.conf").write_text(
        "\n".join(
            [
                f"listeners.tcp.default = {LOOPBACK}:{node['amqp_port']}",
                f"mqtt.listeners.tcp.default = {LOOPBACK}:{node['mqtt_port']}",
                "mqtt.allow_anonymous = false",
                "mqtt.vhost = /",
                "mqtt.exchange = amq.topic",
                f"load_definitions = {pathlib.Path(state['dir']) / 'definitions.json'}",
                "log.console = true",
                "log.console.level = info",
                "log.console.use_colors = off",  # plain text in DIR/<name>.log
                "log.file = false",
                "",
            ]
        )
    )
    (d / "rabbitmq-env.conf").write_text("")
    _write_plugins(state, node, PLUGINS)


def _write_plugins(state: dict, node: dict, plugins: tuple[str, ...]) -> None:
    (_node_dir(state, node) / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")


def _write_shared_files(state: dict) -> None:
    """The Erlang cookie (0400) and the definitions file with the MQTT user (0600)."""
    home = _home(state)
    home.mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    if not cookie.exists():
        fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)))
    definitions = {
        "users": [{"name": state["username"], "password": state["password"], "tags": ""}],
        "vhosts": [{"name": "/"}],
        "permissions": [{"user": state["username"], "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}],
    }
    path = pathlib.Path(state["dir"]) / "definitions.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(definitions, f)


# --- rabbitmqctl ------------------------------------------------------------------


def ctl(state: dict, name: str, *args: str, timeout: float | None = None, check: bool = True) -> str:
    """Run ``rabbitmqctl -n <node> ARGS`` against node `name`; return its stdout."""
    timeout = CTL_TIMEOUT if timeout is None else timeout
    node = _node(state, name)
    cmd = [str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", node["erlang_node"], *args]
    try:
        done = subprocess.run(
            cmd,
            env=_base_env(state),
            cwd=state["dir"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} on node {name} timed out after {timeout:.0f} s") from None
    if check and done.returncode != 0:
        out = " | ".join((done.stderr.strip() or done.stdout.strip()).splitlines()[-3:])
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} on node {name} failed ({done.returncode}): {out}")
    return done.stdout


def _running_nodes(state: dict, name: str) -> set[str]:
    try:
        status = json.loads(ctl(state, name, "cluster_status", "--formatter", "json", timeout=20))
    except (RuntimeError, ValueError):
        return set()
    return set(status.get("running_nodes", []))


# --- processes --------------------------------------------------------------------


def _node(state: dict, name: str) -> dict:
    for node in state["nodes"]:
        if node["name"] == name:
            return node
    raise KeyError(f"no node {name!r} in this cluster (have {[n['name'] for n in state['nodes']]})")


def _start_epmd(state: dict) -> None:
    epmd = _epmd_binary()
    if not epmd:
        raise RuntimeError("epmd not found (is the erlang-base package installed?)")
    log = open(pathlib.Path(state["dir"]) / "epmd.log", "ab")
    proc = subprocess.Popen(
        [epmd, "-address", LOOPBACK, "-port", str(state["epmd_port"])],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=state["dir"],
        start_new_session=True,
    )
    log.close()
    state["epmd_pid"] = proc.pid
    deadline = time.monotonic() + 10
    while not _port_open(state["epmd_port"]):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"epmd on {LOOPBACK}:{state['epmd_port']} did not start: "
                f"{_tail(pathlib.Path(state['dir']) / 'epmd.log')}"
            )
        time.sleep(POLL)


def _spawn(state: dict, node: dict) -> None:
    """Start one node in the background (own session); its console log goes to DIR/<name>.log."""
    pid_file = _node_dir(state, node) / "beam.pid"
    pid_file.unlink(missing_ok=True)
    log_path = pathlib.Path(node["log"])
    log = open(log_path, "ab")
    log.write(f"\n{START_MARKER} {node['erlang_node']} at {time.strftime('%F %T')}\n".encode())
    log.flush()
    proc = subprocess.Popen(
        [str(RABBITMQ_BIN / "rabbitmq-server")],
        env=_node_env(state, node),
        cwd=_node_dir(state, node),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    node["wrapper_pid"] = proc.pid
    node["pid"] = None  # the beam's, once its pid file appears
    node.pop("_start", None)  # a caller's start-time stamp of the old pid (scripts/cluster keeps one)


def _wait_booted(state: dict, node: dict, nudge=None) -> None:
    """Wait for the beam pid file and the end of the boot; RuntimeError with the log tail otherwise.

    nudge(), if given, is called every NUDGE_INTERVAL s once the pid is known, until it returns True.
    """
    timeout = START_TIMEOUT
    pid_file = _node_dir(state, node) / "beam.pid"
    deadline = time.monotonic() + timeout
    next_nudge = 0.0
    while True:
        if not node.get("pid") and pid_file.exists():
            try:
                node["pid"] = int(pid_file.read_text().strip())
            except ValueError:
                pass  # being written
        if node.get("pid") and _port_open(node["amqp_port"]):  # AMQP opens last in the boot
            return
        if nudge and node.get("pid") and time.monotonic() >= next_nudge:
            nudge = None if nudge() else nudge
            next_nudge = time.monotonic() + NUDGE_INTERVAL
        wrapper_gone = not _alive(node["wrapper_pid"])
        if wrapper_gone or time.monotonic() > deadline:
            why = "exited" if wrapper_gone else f"did not start within {timeout:.0f} s"
            _reap(node["wrapper_pid"])
            raise RuntimeError(
                f"rabbitmq node {node['name']} ({node['erlang_node']}) {why}; "
                f"last lines of {node['log']}:\n    {_tail(pathlib.Path(node['log']))}"
            )
        time.sleep(POLL)


def _ours(state: dict, node: dict, pid: int | None) -> bool:
    """pid is alive and was started with this node's environment (guards against pid reuse)."""
    mnesia = str(_node_dir(state, node) / "mnesia")
    return bool(pid) and _alive(pid) and _environ_has(pid, "RABBITMQ_MNESIA_BASE", mnesia)


def _vm_pids(state: dict, node: dict) -> list[int]:
    """The node's live VM processes: beam.smp first, then erl_child_setup, inet_gethost, ..."""
    beam = node.get("pid")
    if not beam:  # killed or asked before the pid was recorded
        try:
            beam = int((_node_dir(state, node) / "beam.pid").read_text().strip())
        except (OSError, ValueError):
            beam = None
    pids = [beam, *_descendants(beam)] if _ours(state, node, beam) else []
    wrapper = node.get("wrapper_pid")
    if _ours(state, node, wrapper):  # also finds a beam that has not written its pid file yet
        pids += [p for p in _descendants(wrapper) if p not in pids]
    return pids


def _running(state: dict, node: dict) -> bool:
    return bool(_vm_pids(state, node)) or _ours(state, node, node.get("wrapper_pid"))


def _kill_node(state: dict, node: dict) -> None:
    """SIGKILL the node's VM processes; the sh wrapper then exits by itself (SIGKILLed if not)."""
    pids = _vm_pids(state, node)
    _sigkill(pids)
    _wait_dead(pids, 5)
    wrapper = node.get("wrapper_pid")
    if wrapper and not _wait_dead([wrapper], 5) and _ours(state, node, wrapper):
        _sigkill([wrapper])
        _wait_dead([wrapper], 5)


def _wait_cluster(state: dict) -> None:
    """Until cluster_status lists every live node as running and each accepts an authenticated MQTT CONNECT.

    Nodes that were kill()ed and not restarted are left out.
    """
    live = [n for n in state["nodes"] if _running(state, n)]
    if not live:
        raise RuntimeError("no rabbitmq node of this cluster is running")
    want = {n["erlang_node"] for n in live}
    timeout = CLUSTER_TIMEOUT
    deadline = time.monotonic() + timeout

    def mqtt_ready(node: dict) -> str | None:
        while True:
            try:
                rc = mqtt_connack(node["mqtt_port"], state["username"], state["password"])
                problem = None if rc == 0 else f"MQTT CONNACK return code {rc}"
            except OSError as exc:
                problem = f"MQTT CONNECT failed: {exc}"
            if problem is None or time.monotonic() > deadline:
                return problem and f"node {node['name']}: {problem}"
            time.sleep(0.2)

    problems = [p for p in _parallel(mqtt_ready, live) if p]
    while not problems:
        running = _running_nodes(state, live[0]["name"])
        if running == want:
            return
        if time.monotonic() > deadline:
            problems.append(
                f"cluster_status on {live[0]['name']}: " f"running_nodes={sorted(running)}, want {sorted(want)}"
            )
        time.sleep(0.5)
    raise RuntimeError(f"rabbitmq cluster not ready after {timeout:.0f} s: " + "; ".join(problems))


def _start_local_mqtt_raft_member(state: dict, node: dict) -> bool:
    """Start the restarting node's member of the MQTT plugin's Raft cluster; True once done or moot.

    RabbitMQ 3.10's MQTT plugin tracks client ids in a Raft cluster with a
    member per node.  A restarted member first asks the others for the
    member list (a leader query, 100 s timeout, retried 100 times) and only
    then starts its own member.  When the live members are no majority
    without it (3 nodes, 2 killed, one of them the leader), no leader can be
    elected, and the restarted node hangs in its MQTT plugin start forever.
    Starting its member first, as here, lets the majority form.  Harmless
    otherwise: the plugin's own restart_server then finds it running.
    """
    try:
        out = ctl(state, node["name"], "eval", START_MQTT_RAFT_MEMBER_ERL, timeout=15).strip()
    except RuntimeError:
        return False  # distribution or the Ra system not up yet
    return out in ("ok", "not_a_member", "already_running") or "already_started" in out


def _join(state: dict, node: dict, seed: dict) -> None:
    """Cluster a stopped (stop_app) node onto seed, enable MQTT on it and start_app it.

    The joining nodes boot without the MQTT plugin: it would spend 3-6 s
    waiting for peers before electing itself the leader of a one-node
    client-id-tracking Raft cluster, which join_cluster then throws away.
    Started after the join, it finds the seed's Raft cluster and joins it.
    """
    ctl(state, node["name"], "join_cluster", seed["erlang_node"])
    _write_plugins(state, node, PLUGINS)
    ctl(state, node["name"], "start_app", timeout=START_TIMEOUT)


# --- public interface ---------------------------------------------------------------


def start(dir: pathlib.Path, nodes: int) -> dict:
    """Start a `nodes`-node cluster under `dir` and return its state once all nodes serve MQTT."""
    if not 1 <= nodes <= len(NODE_NAMES):
        raise ValueError(f"nodes must be 1..{len(NODE_NAMES)}, got {nodes}")
    t0 = time.monotonic()
    ensure_installed()
    dir = pathlib.Path(dir).resolve()
    if _pids_with_env_prefix("RABBITMQ_MNESIA_BASE", str(dir) + os.sep):
        raise RuntimeError(f"a rabbitmq node started under {dir} is still running; stop() that cluster first")
    for name in NODE_NAMES[:nodes]:
        shutil.rmtree(dir / name, ignore_errors=True)  # a fresh cluster: no mnesia left from an earlier one
    dir.mkdir(parents=True, exist_ok=True)
    ports = _free_ports(1 + 3 * nodes)
    state = {
        "kind": "rabbitmq",
        "dir": str(dir),
        "nodes": [],
        "username": USERNAME,
        "password": secrets.token_urlsafe(18),
        "amqp_ports": [],
        "epmd_port": ports[0],
        "epmd_pid": None,
    }
    for i in range(nodes):
        name = NODE_NAMES[i]
        amqp, mqtt, dist = ports[1 + 3 * i : 4 + 3 * i]
        state["nodes"].append(
            {
                "name": name,
                "url": f"mqtt://{LOOPBACK}:{mqtt}",
                "pid": None,
                "erlang_node": _erlang_node(name),
                "mqtt_port": mqtt,
                "amqp_port": amqp,
                "dist_port": dist,
                "wrapper_pid": None,
                "log": str(dir / f"{name}.log"),
            }
        )
        state["amqp_ports"].append(amqp)
    try:
        _write_shared_files(state)
        seed, *others = state["nodes"]
        for node in state["nodes"]:
            _write_node_files(state, node)
        for node in others:  # MQTT comes after the join (see _join)
            _write_plugins(state, node, ())
        _start_epmd(state)
        for node in state["nodes"]:
            _spawn(state, node)

        def boot(node: dict) -> None:
            _wait_booted(state, node)
            if node is not seed:
                ctl(state, node["name"], "stop_app")

        _parallel(boot, state["nodes"])
        for node in others:  # one at a time: mnesia_monitor crashes when two nodes start_app at once
            _join(state, node, seed)
        _wait_cluster(state)
    except BaseException:
        stop(state)
        raise
    state["start_seconds"] = round(time.monotonic() - t0, 1)
    return state


def stop(state: dict) -> None:
    """Stop every node (rabbitmqctl stop, then SIGKILL what is left) and our epmd. Idempotent."""

    def stop_node(node: dict) -> None:
        if _vm_pids(state, node):
            try:
                ctl(state, node["name"], "stop", timeout=STOP_TIMEOUT, check=False)
            except RuntimeError:
                pass
            _wait_dead(_vm_pids(state, node), 5)
        _kill_node(state, node)

    _parallel(stop_node, state.get("nodes", []))
    epmd = state.get("epmd_pid")
    if _alive(epmd) and f"\0-port\0{state['epmd_port']}\0".encode() in _cmdline(epmd):
        _sigkill([epmd])
    _wait_dead([epmd] if epmd else [], 5)


def kill(state: dict, name: str) -> None:
    """Crash node `name`: SIGKILL its beam.smp and the VM's helper processes (no clean shutdown)."""
    _kill_node(state, _node(state, name))


def restart(state: dict, name: str) -> dict:
    """Start killed node `name` again (same ports, data and config); it rejoins from its mnesia dir.

    Returns the state with the node's new pids.  Another node must be running (see the module doc).
    """
    node = _node(state, name)
    if _running(state, node):
        raise RuntimeError(f"rabbitmq node {name} is still running; kill() it first")
    if not _alive(state.get("epmd_pid")):
        _start_epmd(state)
    _spawn(state, node)
    try:
        _wait_booted(state, node, nudge=lambda: _start_local_mqtt_raft_member(state, node))
        _wait_cluster(state)
    except BaseException:
        _kill_node(state, node)
        raise
    return state
