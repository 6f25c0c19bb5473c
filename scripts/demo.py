"""The edgeprune demo: a local fleet on this machine, driven like a real one.

Starts a broker (Mosquitto if installed, else the embedded one) and three agent
processes, each holding its own shard of the built-in digits data, then runs the
coordinator commands a user would. The broker and agents keep running after
the demo so you can look at the traffic; `./scripts/demo stop` ends them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
PIDS = DEMO / "pids.json"
FLEET = "demo"
DEVICES = ("pi-1", "pi-2", "pi-3")
BIN = Path(sys.executable).parent


def step(msg: str) -> None:
    print(f"\n\033[1m==> {msg}\033[0m", flush=True)


def stop_previous() -> None:
    if not PIDS.exists():
        return
    info = json.loads(PIDS.read_text())
    for pid in info.get("agents", []) + [info.get("broker")]:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError, TypeError):
            pass
    time.sleep(0.5)
    PIDS.unlink()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto does: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def latest_run() -> str:
    out = subprocess.run([str(BIN / "edgeprune"), "runs", "--json"], capture_output=True, text=True, check=True)
    return next(r["run_id"] for r in json.loads(out.stdout) if r["kind"] == "train" and r["fleet"] == FLEET)


def run(*args: str) -> int:
    print("$ " + " ".join(args), flush=True)
    return subprocess.call([str(BIN / args[0]), *args[1:]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", nargs="?", default="run", choices=["run", "stop"])
    parser.add_argument(
        "--embedded", action="store_true", help="use the embedded broker even if Mosquitto is installed"
    )
    args = parser.parse_args()
    stop_previous()
    if args.action == "stop":
        print("demo fleet stopped")
        return 0

    sys.path.insert(0, str(ROOT))
    from coordinator import broker as broker_mod

    DEMO.mkdir(exist_ok=True)
    port = 1883 if port_free(1883) else broker_mod.free_port()
    kind = "embedded" if args.embedded or not broker_mod.mosquitto_path() else "mosquitto"
    step(f"starting a {kind} broker on 127.0.0.1:{port}")
    broker = broker_mod.start(kind, "127.0.0.1", port, DEMO / "broker", log_file=DEMO / "broker.log")
    pids = {"broker": broker.proc.pid, "agents": []}
    PIDS.write_text(json.dumps(pids))

    step(f"starting {len(DEVICES)} agents, each with its own shard of the digits data")
    for i, dev in enumerate(DEVICES):
        cmd = [
            str(BIN / "edgeprune-agent"),
            "run",
            "--broker",
            broker.url,
            "--fleet",
            FLEET,
            "--device-id",
            dev,
            "--state-dir",
            str(DEMO / "agents" / dev),
            "--data",
            "digits",
            "--data-shard",
            f"{i}/{len(DEVICES)}",
            "--heartbeat-s",
            "5",
            "--train-threads",
            "1",
        ]
        proc = subprocess.Popen(
            cmd, stdout=open(DEMO / f"{dev}.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        pids["agents"].append(proc.pid)
        print(f"  {dev}: pid {proc.pid}, log .demo/{dev}.log")
    PIDS.write_text(json.dumps(pids))

    step("the fleet, as the coordinator sees it")
    time.sleep(1.0)
    rc = run("edgeprune", "devices", "--broker", broker.url, "--fleet", FLEET, "--caps", "--wait", "3")
    if rc != 0:
        return rc

    step("federated pruning-aware training: 80% sparsity, each agent trains on its own digits shard")
    rc = run(
        "edgeprune",
        "train",
        "--broker",
        broker.url,
        "--fleet",
        FLEET,
        "--model",
        "digits_cnn",
        "--rounds",
        "8",
        "--sparsity",
        "0.8",
        "--wait-for",
        str(len(DEVICES)),
    )
    if rc != 0:
        return rc
    run_id = latest_run()

    step("export the pruned global model to TFLite: dense, sparse, sparse-int8, fp16")
    if run("edgeprune", "export", run_id) != 0:
        return 1

    step("benchmark every variant on every agent (interleaved A/B on each device)")
    if run("edgeprune", "bench", "--broker", broker.url, "--fleet", FLEET, "--model", run_id, "--runs", "300") != 0:
        return 1

    step("report")
    html = DEMO / f"report-{run_id}.html"
    if run("edgeprune", "report", run_id, "--html", str(html)) != 0:
        return 1

    host_flag = "" if port == 1883 else f" -p {port}"
    step("the demo fleet keeps running; try:")
    print(f"  mosquitto_sub{host_flag} -t 'edgeprune/#' -v                 # retained status and capabilities")
    print(f"  mosquitto_pub{host_flag} -t edgeprune/v1/{FLEET}/device/pi-1/cmd -m garbage   # -> an error reply")
    print(f"  .venv/bin/edgeprune ping --broker {broker.url} --fleet {FLEET} --device pi-1")
    print(f"  .venv/bin/edgeprune show {run_id}            # the run, round by round")
    print(f"  open {html}")
    from coordinator.store import default_home  # the home the commands above used (EDGEPRUNE_HOME or the default)

    print(f"  .venv/bin/tensorboard --logdir {default_home() / 'runs'}   # then open http://localhost:6006")
    print("  ./scripts/demo stop                                        # stop broker and agents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
