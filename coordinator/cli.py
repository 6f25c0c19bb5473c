"""``edgeprune``: the coordinator command line.

Each subcommand is a small function here; the work lives in the module named
after its concept (session, rounds, export, bench, report...).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from . import __version__, output
from .store import Store, default_home

DESCRIPTION = """\
edgeprune: pruning-aware federated learning and on-device benchmarking for
fleets of Raspberry-Pi-class devices, over MQTT.

  edgeprune broker              run an MQTT broker for the fleet (Mosquitto, or embedded)
  edgeprune devices             list the fleet's devices, their state and capabilities
  edgeprune ping --device ID    round-trip a command to one device

Common settings come from flags or EDGEPRUNE_BROKER, EDGEPRUNE_FLEET,
EDGEPRUNE_HOME. Every command takes --json for scripts.
"""


def _common(p: argparse.ArgumentParser, broker: bool = True) -> None:
    if broker:
        p.add_argument("--broker", default=os.environ.get("EDGEPRUNE_BROKER", "mqtt://127.0.0.1:1883"),
                       help="MQTT broker URL [env EDGEPRUNE_BROKER; default mqtt://127.0.0.1:1883]")
        p.add_argument("--fleet", default=os.environ.get("EDGEPRUNE_FLEET", "default"),
                       help="fleet name [env EDGEPRUNE_FLEET; default 'default']")
    p.add_argument("--home", default=None,
                   help="coordinator home: database, runs, artifacts [env EDGEPRUNE_HOME; default ~/.local/share/edgeprune]")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")


def _store(args: argparse.Namespace) -> Store:
    return Store(args.home or default_home())


def _session(args: argparse.Namespace, long_running: bool = False):
    from .session import Session

    return Session(args.broker, args.fleet, _store(args), long_running=long_running).start(args.connect_timeout)


# -- broker ------------------------------------------------------------------

def cmd_broker(args: argparse.Namespace) -> int:
    from . import broker

    broker.warn_if_exposed(args.host)
    kind = "embedded" if args.embedded else ("mosquitto" if broker.mosquitto_path() else "embedded")
    url = f"mqtt://{args.host}:{args.port}"
    if args.json:
        output.print_json({"kind": kind, "url": url})
    else:
        print(f"edgeprune broker: {kind} on {url} (Ctrl-C to stop)", file=sys.stderr)
    if kind == "embedded":
        broker.run_embedded(args.host, args.port)
        return 0
    workdir = (args.home and os.path.join(args.home, "broker")) or str(default_home() / "broker")
    os.makedirs(workdir, exist_ok=True)
    conf = os.path.join(workdir, f"mosquitto-{args.port}.conf")
    with open(conf, "w") as f:
        f.write(broker.mosquitto_config(args.host, args.port, broker.Path(workdir), args.persistence))
    os.execv(broker.mosquitto_path(), [broker.mosquitto_path(), "-c", conf])
    return 0  # not reached


# -- devices -----------------------------------------------------------------

def cmd_devices(args: argparse.Namespace) -> int:
    try:
        session = _session(args)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    try:
        rows = session.discover(args.wait)
    finally:
        session.close()
    known = {r["device_id"] for r in rows}
    for old in session.store.devices(args.fleet):  # registry entries the broker no longer knows
        if old["device_id"] not in known:
            rows.append({"device_id": old["device_id"], "state": "offline" if old["state"] != "unknown" else "unknown",
                         "arch": (old["caps"] or {}).get("arch"), "runtimes": (old["caps"] or {}).get("runtimes") or {},
                         "runtime": next(iter((old["caps"] or {}).get("runtimes") or {}), None),
                         "can_train": (old["caps"] or {}).get("can_train"), "last_seen": old["last_seen"],
                         "task": None, "caps": old["caps"]})
    if args.json:
        output.print_json({"fleet": args.fleet, "devices": rows})
        return 0
    if not rows:
        print(f"no devices in fleet {args.fleet!r} at {args.broker}")
        return 0
    output.table(f"fleet {args.fleet} ({sum(r['state'] in ('online', 'busy') for r in rows)}/{len(rows)} online)",
                 ["device", "state", "arch", "runtime", "can train", "last seen"],
                 [[r["device_id"], r["state"] + (f" ({r['task']})" if r.get("task") else ""), r["arch"],
                   f"{r['runtime']} {r['runtimes'][r['runtime']]}" if r["runtime"] else "none",
                   {True: "yes", False: "no"}.get(r["can_train"], "?"), output.ago(r["last_seen"])] for r in rows])
    if args.caps:
        _print_caps([r for r in rows if r["caps"]])
    return 0


def _print_caps(rows: list[dict]) -> None:
    """Capabilities as a property x device table (readable for a handful of devices)."""
    def sensors(c: dict) -> str:
        s = c.get("sensors") or {}
        found = [f"{len(s.get('thermal_zones') or [])} thermal"]
        found += ["power:" + ",".join(s["power_sensors"])] if s.get("power_sensors") else []
        found += ["battery"] if s.get("batteries") else []
        found += ["vcgencmd"] if s.get("vcgencmd") else []
        return ", ".join(found)

    props = [
        ("os", lambda c: c.get("os_release")),
        ("arch", lambda c: c.get("arch")),
        ("cpu", lambda c: c.get("cpu_model")),
        ("cores / max MHz", lambda c: f"{c.get('cpu_cores')} / {c['cpu_max_mhz']:.0f}" if c.get("cpu_max_mhz") else f"{c.get('cpu_cores')} / n/a"),
        ("RAM avail / total", lambda c: f"{output.human_bytes(c.get('ram_available_bytes'))} / {output.human_bytes(c.get('ram_total_bytes'))}"),
        ("disk free", lambda c: output.human_bytes(c.get("disk_free_bytes"))),
        ("python", lambda c: c.get("python_version")),
        ("agent / protocol", lambda c: f"{c.get('agent_version')} / {c.get('protocol_version')}"),
        ("runtimes", lambda c: ", ".join(f"{k} {v}" for k, v in (c.get("runtimes") or {}).items()) or "none"),
        ("train stack", lambda c: ", ".join(f"{k} {v}" for k, v in (c.get("train_stack") or {}).items()) or "none"),
        ("sensors", sensors),
    ]
    output.table("capabilities", ["", *[r["device_id"] for r in rows]],
                 [[name, *[fn(r["caps"]) for r in rows]] for name, fn in props])


# -- ping --------------------------------------------------------------------

def cmd_ping(args: argparse.Namespace) -> int:
    try:
        session = _session(args)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    results = []
    try:
        for i in range(args.count):
            t0 = time.perf_counter()
            reply = session.call(args.device, "ping", timeout_s=args.timeout)
            rtt_ms = (time.perf_counter() - t0) * 1000
            results.append({"seq": i, "ok": reply.ok, "rtt_ms": round(rtt_ms, 3) if reply.ok else None,
                            "error": reply.error})
            if not args.json:
                print(f"{args.device}: seq={i} " + (f"rtt={rtt_ms:.1f} ms" if reply.ok else f"error {reply.error_code}: {reply.error_message}"))
            if i + 1 < args.count:
                time.sleep(args.interval)
    finally:
        session.close()
    rtts = sorted(r["rtt_ms"] for r in results if r["ok"])
    summary = {"device_id": args.device, "sent": len(results), "received": len(rtts),
               "min_ms": rtts[0] if rtts else None, "median_ms": rtts[len(rtts) // 2] if rtts else None,
               "max_ms": rtts[-1] if rtts else None, "pings": results}
    if args.json:
        output.print_json(summary)
    elif rtts:
        print(f"{len(rtts)}/{len(results)} replies, rtt min/median/max = {rtts[0]:.1f}/{rtts[len(rtts) // 2]:.1f}/{rtts[-1]:.1f} ms")
    return 0 if rtts else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeprune", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run an MQTT broker (Mosquitto if installed, else embedded amqtt)",
                       description="Run an MQTT broker in the foreground: Mosquitto with a generated config when "
                                   "`mosquitto` is installed, otherwise the embedded pure-Python amqtt broker.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others get a warning: no TLS)")
    p.add_argument("--port", type=int, default=1883, help="port (default 1883)")
    p.add_argument("--embedded", action="store_true", help="use the embedded amqtt broker even if Mosquitto is installed")
    p.add_argument("--persistence", action="store_true", help="Mosquitto: keep retained messages and sessions across restarts")
    _common(p, broker=False)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("devices", help="list devices: state, architecture, runtime, can-train, last seen",
                       description="Probe the fleet (agents answer by re-announcing) and list every device. "
                                   "States: online, busy, stale (no heartbeat for 3 intervals / no answer to the probe), "
                                   "offline (said goodbye or its Will fired).")
    _common(p)
    p.add_argument("--wait", type=float, default=2.0, help="seconds to wait for agents to answer the probe (default 2)")
    p.add_argument("--caps", action="store_true", help="also print each device's capabilities")
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("ping", help="round-trip a command to a device and print the latency")
    _common(p)
    p.add_argument("--device", required=True, help="device id")
    p.add_argument("--count", type=int, default=3, help="number of pings (default 3)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between pings")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reply")
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_ping)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
