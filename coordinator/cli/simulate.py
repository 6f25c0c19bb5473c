"""`edgeprune` commands: a simulated fleet on this machine (real agents, synthetic trainer). Each command's flags sit beside its handler."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .. import output
from .common import _common


def cmd_simulate(args: argparse.Namespace) -> int:
    import math
    import shutil
    import signal
    import subprocess
    import tempfile

    from edge_agent.common.link import parse_broker_urls

    from ..broker import wait_for_port

    if args.devices < 1 or (args.processes is not None and args.processes < 1) or args.delay < 0 or args.workers < 1:
        return output.fail(
            "--devices, --processes and --workers must be >= 1, --delay >= 0", code="usage", as_json=args.json, status=2
        )
    if args.trainer == "tf":
        from edge_agent.ml import tfenv

        if not tfenv.available():
            return output.fail(
                "--trainer tf needs TensorFlow + TF-MOT (pip install edgeprune[train])",
                code="unsupported",
                as_json=args.json,
                status=2,
            )
        if args.processes is None:
            args.processes = 1  # the workers are the parallelism; one process shares them among all devices
    try:
        addr = parse_broker_urls(args.broker)[0]
    except ValueError as exc:
        return output.fail(str(exc), code="usage", as_json=args.json, status=2)
    if addr.tls:
        return output.fail(
            "simulate runs plain MQTT agents (no device certificates): use an mqtt:// broker",
            code="usage",
            as_json=args.json,
            status=2,
        )
    if not wait_for_port(addr.host, addr.port, 5.0):
        return output.fail(
            f"cannot reach the broker at {addr.host}:{addr.port} (start one: edgeprune broker)",
            code="connect",
            as_json=args.json,
        )
    procs_n = min(args.devices, args.processes or (os.cpu_count() or 1))
    per = math.ceil(args.devices / procs_n)
    root = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="edgeprune-sim-"))
    t0 = time.perf_counter()
    procs = []
    for i in range(procs_n):
        first, count = i * per, min(per, args.devices - i * per)
        if count <= 0:
            break
        cmd = [
            sys.executable,
            "-m",
            "edge_agent.simulate",
            "--broker",
            args.broker,
            "--fleet",
            args.fleet,
            "--prefix",
            args.prefix,
            "--first",
            str(first),
            "--count",
            str(count),
            "--delay",
            str(args.delay),
            "--samples",
            str(args.samples),
            "--state-root",
            str(root),
        ]
        if args.heartbeat_s:
            cmd += ["--heartbeat-s", str(args.heartbeat_s)]
        if args.keepalive_s:
            cmd += ["--keepalive-s", str(args.keepalive_s)]
        if args.username:  # the password reaches the children through the environment, as it reached us
            cmd += ["--username", args.username]
        if args.trainer == "tf":
            cmd += [
                "--trainer",
                "tf",
                "--workers",
                str(args.workers),
                "--total",
                str(args.devices),
                "--data",
                args.data,
                "--partition",
                args.partition,
                "--data-seed",
                str(args.data_seed),
                "--train-threads",
                str(args.train_threads),
            ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    stopping = {"flag": False}

    def _stop(*_):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    hosts = []
    for p in procs:
        line = p.stdout.readline()
        try:
            hosts.append(json.loads(line))
        except ValueError:
            hosts.append({"pid": p.pid, "agents": 0, "connected": 0, "error": f"exit code {p.poll()}"})
    ready = {
        "event": "ready",
        "devices": args.devices,
        "processes": len(procs),
        "fleet": args.fleet,
        "broker": args.broker,
        "connected": sum(h["connected"] for h in hosts),
        "ready_s": round(time.perf_counter() - t0, 3),
        "pids": [p.pid for p in procs],
        "state_dir": str(root),
    }
    if args.json:
        print(json.dumps(ready), flush=True)
    else:
        print(
            f"{ready['connected']}/{args.devices} simulated agents connected in {ready['ready_s']:.1f} s "
            f"({len(procs)} processes, fleet {args.fleet!r}, ids {args.prefix}-00000...); Ctrl-C stops them",
            flush=True,
        )
    deadline = time.monotonic() + args.duration if args.duration else None
    died = None
    while not stopping["flag"] and (deadline is None or time.monotonic() < deadline):
        died = next((p for p in procs if p.poll() is not None), None)
        if died is not None:
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 60  # one deadline for all: each stops its agents in parallel
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    if not args.state_dir:
        shutil.rmtree(root, ignore_errors=True)
    if died is not None:
        return output.fail(
            f"a simulator process ({died.pid}) exited with code {died.returncode}", code="died", as_json=args.json
        )
    if args.json:
        print(json.dumps({"event": "stopped", "devices": args.devices}), flush=True)
    return 0 if ready["connected"] == args.devices else 1


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="run N simulated agents (real agent code, synthetic trainer) for scale tests",
        description="Start N lightweight agents packed into a few processes: each is the real agent "
        "(its own MQTT connection, presence, commands, blob transfer, outbox), with a "
        "synthetic trainer that answers a round after --delay seconds with a correctly "
        "shaped sparse update of the model it was sent; no TensorFlow. Runs until Ctrl-C "
        "(or --duration). Then `edgeprune train --fleet FLEET --eval-data none "
        "--input-shape 8 8 1 --num-classes 10` trains over them.",
    )
    _common(p, broker=True)
    p.set_defaults(fleet=os.environ.get("EDGEPRUNE_FLEET", "sim"))
    p.add_argument("--devices", type=int, required=True, help="number of simulated devices")
    p.add_argument("--processes", type=int, default=None, help="processes to pack them into (default: CPU count)")
    p.add_argument("--delay", type=float, default=1.0, help="seconds a synthetic training round takes (default 1)")
    p.add_argument(
        "--samples", type=int, default=100, help="samples each device claims (its FedAvg weight; default 100)"
    )
    p.add_argument("--prefix", default="sim", help="device ids are PREFIX-00000, PREFIX-00001, ... (default sim)")
    p.add_argument("--heartbeat-s", type=float, default=None, help="heartbeat interval (default: the agent's, 10 s)")
    p.add_argument(
        "--keepalive-s",
        type=int,
        default=None,
        help="MQTT keepalive (default 60: hundreds of agents share a process, and a busy one must not "
        "be taken for a dead device)",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default: run until Ctrl-C)"
    )
    p.add_argument(
        "--state-dir", default=None, help="keep the agents' state here (default: a temporary directory, removed)"
    )
    p.add_argument(
        "--trainer",
        choices=["synthetic", "tf"],
        default="synthetic",
        help="synthetic: answer each round with a correctly shaped update, no TensorFlow (scale tests); "
        "tf: every device really trains with TF-MOT on its own shard of --data, in --workers warm "
        "TensorFlow workers per process (memory bounded by the workers, not the devices) "
        "(default: %(default)s)",
    )
    p.add_argument("--workers", type=int, default=2, help="tf: TensorFlow workers per process (default: %(default)s)")
    p.add_argument(
        "--data",
        default="digits",
        help="tf: built-in data the shards come from, e.g. fashion-mnist " "(default: %(default)s)",
    )
    p.add_argument("--partition", default="iid", help="tf: iid, dirichlet:ALPHA or classes:C (default: %(default)s)")
    p.add_argument("--data-seed", type=int, default=0, help="tf: seed of the partition (default: %(default)s)")
    p.add_argument(
        "--train-threads", type=int, default=1, help="tf: TensorFlow threads per worker " "(default: %(default)s)"
    )
    p.set_defaults(func=cmd_simulate)
