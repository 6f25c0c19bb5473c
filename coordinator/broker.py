"""Run an MQTT broker: Mosquitto when installed, else an embedded amqtt broker.

Mosquitto (Debian package ``mosquitto``) is the real thing: fast, small, with
persistence, TLS and ACLs. The embedded broker (pure-Python ``amqtt``) exists so
that a laptop with only pip can run the demo; it speaks MQTT 3.1.1 only, which
is all the edgeprune protocol uses.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def mosquitto_path() -> str | None:
    for candidate in MOSQUITTO_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_problem(host: str, port: int) -> str | None:
    """Why a broker could not listen on host:port (in use, not an address of this machine), or None."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        if exc.errno == 98:
            return f"port {port} on {host} is already in use (another broker? `ss -ltnp 'sport = :{port}'` shows it)"
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_config(
    host: str,
    port: int,
    workdir: Path,
    persistence: bool = False,
    pki_dir: Path | None = None,
    sys_interval_s: int | None = None,
    password_file: Path | None = None,
) -> str:
    """A Mosquitto 2.0 config for one listener: plain, or TLS with client certificates and the fleet ACL.

    Queues are raised from the defaults because a coordinator receiving replies
    from a large fleet at once must not have QoS-1 messages dropped silently
    (Mosquitto does not tell a 3.1.1 publisher when it drops).
    """
    lines = [f"listener {port} {host}"]
    if os.geteuid() == 0:
        # started as root, Mosquitto switches to user "mosquitto", which cannot read the ACL, keys and
        # persistence files edgeprune keeps in root's private directories: stay the user who started it
        lines.append("user root")
    if password_file is not None:  # user name + password in CONNECT (what EMQX, HiveMQ, RabbitMQ fleets use)
        lines += [f"password_file {password_file}", "allow_anonymous false"]
    elif pki_dir is None:
        lines.append("allow_anonymous true")
    else:
        from .pki import mosquitto_acl

        acl = workdir / f"acl-{port}"
        acl.write_text(mosquitto_acl())
        lines += [
            f"cafile {pki_dir / 'ca.crt'}",
            f"certfile {pki_dir / 'broker.crt'}",
            f"keyfile {pki_dir / 'broker.key'}",
            "require_certificate true",  # no certificate from our CA, no connection
            "use_identity_as_username true",  # the certificate's CN is the user the ACL names
            "allow_anonymous false",
            f"acl_file {acl}",
        ]
    lines += [
        f"persistence {'true' if persistence else 'false'}",
        "max_inflight_messages 100",
        "max_queued_messages 100000",
        "max_queued_bytes 0",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if persistence:
        lines += [f"persistence_location {workdir}/", "autosave_interval 5"]
    if sys_interval_s is not None:  # $SYS/broker/... counters (messages, bytes), for benchmarks
        lines.append(f"sys_interval {sys_interval_s}")
    return "\n".join(lines) + "\n"


@dataclass
class BrokerProcess:
    """A broker running as a child process."""

    kind: str
    host: str
    port: int
    proc: subprocess.Popen
    workdir: Path
    tls: bool = False
    log_file: Path | None = None

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file and self.log_file.exists() else ""

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def warn_if_exposed(host: str) -> None:
    if host not in LOOPBACK:
        log.warning(
            "broker listens on %s without TLS: anyone on that network can join the fleet; "
            "use it for local demos only",
            host,
        )


def start(
    kind: str = "auto",
    host: str = "127.0.0.1",
    port: int = 0,
    workdir: str | os.PathLike | None = None,
    persistence: bool = False,
    log_file: str | os.PathLike | None = None,
    pki_dir: str | os.PathLike | None = None,
    sys_interval_s: int | None = None,
    users: dict[str, str] | None = None,
) -> BrokerProcess:
    """Start a broker child process and wait until it accepts connections.

    ``kind``: ``mosquitto``, ``embedded`` or ``auto`` (Mosquitto if installed).
    ``users``: user name -> password; anonymous clients are then refused (Mosquitto only).
    """
    if kind == "auto":
        kind = "mosquitto" if mosquitto_path() else "embedded"
    port = port or free_port(host)
    work = Path(workdir) if workdir else Path.cwd()
    work.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    if kind == "mosquitto":
        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto), use --embedded")
        conf = work / f"mosquitto-{port}.conf"
        passwords = None
        if users:
            passwords = work / f"passwords-{port}"
            passwords.write_text("")
            os.chmod(passwords, 0o600)
            for user, password in users.items():  # mosquitto_passwd stores salted hashes, never the password
                subprocess.run(
                    [shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b", str(passwords), user, password],
                    check=True,
                    capture_output=True,
                )
        conf.write_text(
            mosquitto_config(
                host, port, work, persistence, Path(pki_dir) if pki_dir else None, sys_interval_s, passwords
            )
        )
        cmd = [exe, "-c", str(conf)]
    elif pki_dir is not None or users:
        raise RuntimeError(
            "a secure broker (TLS, client certificates, ACL) needs Mosquitto (apt-get install mosquitto)"
        )
    elif kind == "embedded":
        cmd = [sys.executable, "-m", "coordinator.broker", "--host", host, "--port", str(port)]
    else:
        raise ValueError(f"unknown broker kind {kind!r}")
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    if not wait_for_port(host, port, 20.0):
        proc.kill()
        raise RuntimeError(f"{kind} broker did not start listening on {host}:{port}: {' '.join(cmd)}")
    return BrokerProcess(
        kind, host, port, proc, work, tls=pki_dir is not None, log_file=Path(log_file) if log_file else None
    )


def run_embedded(host: str, port: int) -> None:
    """Serve MQTT 3.1.1 with amqtt in this process until interrupted."""
    import asyncio

    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def serve() -> None:
        broker = Broker(config)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.shutdown()

    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    asyncio.run(serve())


if __name__ == "__main__":  # used by start(kind="embedded")
    import argparse

    p = argparse.ArgumentParser(description="embedded amqtt broker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run_embedded(a.host, a.port)


SYS_TOPICS = ("messages/received", "messages/sent", "bytes/received", "bytes/sent")


class SysCounters:
    """Mosquitto's $SYS totals (messages and bytes in and out), refreshed every second: start the broker
    with ``sys_interval_s=1``. For benchmarks and tests that check what crossed the broker."""

    def __init__(self, url: str):
        import paho.mqtt.client as mqtt

        host, port = url.split("//")[1].split(":")
        self.values: dict[str, int] = {}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.c.on_message = lambda c, u, m: self.values.__setitem__(m.topic.split("broker/", 1)[1], int(m.payload))
        self.c.connect(host, int(port))
        for t in SYS_TOPICS:
            self.c.subscribe(f"$SYS/broker/{t}")
        self.c.loop_start()

    def snapshot(self) -> dict[str, int]:
        time.sleep(2.2)  # two refreshes: the totals include everything before this call
        return dict(self.values)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()
