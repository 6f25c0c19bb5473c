"""`edgeprune` commands: the fleet: devices, ping, an agent's logs. Each command's flags sit beside its handler."""

from __future__ import annotations

import argparse
import time

from edge_agent.protocol.args import Logs

from .. import output
from ..fleet import is_live
from .common import _common, _device_id, _session


def _can_train_text(row: dict) -> str:
    if row.get("can_train") is None:
        return "?"
    if not row["can_train"]:
        return "no (no TF stack)"
    return "no (no data)" if row.get("has_data") is False else "yes"


def cmd_devices(args: argparse.Namespace) -> int:
    try:
        session = _session(args)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    try:
        session.discover(args.wait)
        rows = session.fleet_rows()  # with the registry's devices the broker no longer shows
        fleets = session.fleets_seen() if not rows else {}
    finally:
        session.close()
    if args.json:
        output.print_json({"fleet": args.fleet, "devices": rows, **({"fleets_on_broker": fleets} if not rows else {})})
        return 0
    if not rows:
        others = ", ".join(f"{f} ({n} devices)" for f, n in fleets.items())
        print(
            f"no devices in fleet {args.fleet!r} at {args.broker}"
            + (f"; fleets on this broker: {others} (--fleet NAME)" if others else "; no fleet has devices there")
        )
        return 0
    output.table(
        f"fleet {args.fleet} ({sum(r['state'] in ('online', 'busy') for r in rows)}/{len(rows)} online)",
        ["device", "state", "arch", "runtime", "can train", "last seen"],
        [
            [
                r["device_id"],
                r["state"] + (f" ({r['task']})" if r.get("task") else ""),
                r["arch"],
                f"{r['runtime']} {r['runtimes'][r['runtime']]}" if r["runtime"] else "none",
                _can_train_text(r),
                output.ago(r["last_seen"]),
            ]
            for r in rows
        ],
    )
    if args.caps:
        _print_caps([r for r in rows if r["caps"]])
    return 0


def cmd_devices_forget(args: argparse.Namespace) -> int:
    try:
        session = _session(args)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    try:
        session.discover(1.0)
        rows = {r["device_id"]: r for r in session.fleet_rows()}
        if args.device not in rows:
            return output.fail(
                f"no device {args.device!r} in fleet {args.fleet!r}", code="not_found", as_json=args.json
            )
        if is_live(rows[args.device]):
            return output.fail(
                f"{args.device} is {rows[args.device]['state']}: stop its agent (or unflash it) first, "
                f"or it re-announces itself at once",
                code="busy",
                as_json=args.json,
            )
        session.clear_device(args.device)
    finally:
        session.close()
    if args.json:
        output.print_json({"forgotten": args.device, "fleet": args.fleet})
    else:
        print(f"forgot {args.device} (fleet {args.fleet})")
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
        (
            "cores / max MHz",
            lambda c: f"{c.get('cpu_cores')} / {c['cpu_max_mhz']:.0f}"
            if c.get("cpu_max_mhz")
            else f"{c.get('cpu_cores')} / n/a",
        ),
        (
            "RAM avail / total",
            lambda c: f"{output.human_bytes(c.get('ram_available_bytes'))} / {output.human_bytes(c.get('ram_total_bytes'))}",
        ),
        ("disk free", lambda c: output.human_bytes(c.get("disk_free_bytes"))),
        ("python", lambda c: c.get("python_version")),
        ("agent / protocol", lambda c: f"{c.get('agent_version')} / {c.get('protocol_version')}"),
        ("runtimes", lambda c: ", ".join(f"{k} {v}" for k, v in (c.get("runtimes") or {}).items()) or "none"),
        ("train stack", lambda c: ", ".join(f"{k} {v}" for k, v in (c.get("train_stack") or {}).items()) or "none"),
        ("sensors", sensors),
    ]
    output.table(
        "capabilities",
        ["", *[r["device_id"] for r in rows]],
        [[name, *[fn(r["caps"]) for r in rows]] for name, fn in props],
    )


def cmd_ping(args: argparse.Namespace) -> int:
    try:
        session = _session(args)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    results = []
    try:
        session.discover(1.0)
        known = {r["device_id"]: r for r in session.fleet_rows()}
        if args.device not in known:
            ids = ", ".join(sorted(known)) or "none"
            return output.fail(
                f"{args.device} has never been seen in fleet {args.fleet!r} (devices there: {ids})",
                code="not_found",
                as_json=args.json,
            )
        for i in range(args.count):
            t0 = time.perf_counter()
            reply = session.call(args.device, "ping", timeout_s=args.timeout)
            rtt_ms = (time.perf_counter() - t0) * 1000
            results.append(
                {"seq": i, "ok": reply.ok, "rtt_ms": round(rtt_ms, 3) if reply.ok else None, "error": reply.error}
            )
            if not args.json:
                print(
                    f"{args.device}: seq={i} "
                    + (f"rtt={rtt_ms:.1f} ms" if reply.ok else f"error {reply.error_code}: {reply.error_message}")
                )
            if i + 1 < args.count:
                time.sleep(args.interval)
    finally:
        session.close()
    rtts = sorted(r["rtt_ms"] for r in results if r["ok"])
    summary = {
        "device_id": args.device,
        "sent": len(results),
        "received": len(rtts),
        "min_ms": rtts[0] if rtts else None,
        "median_ms": rtts[len(rtts) // 2] if rtts else None,
        "max_ms": rtts[-1] if rtts else None,
        "pings": results,
    }
    if args.json:
        output.print_json(summary)
    elif rtts:
        print(
            f"{len(rtts)}/{len(results)} replies, rtt min/median/max = {rtts[0]:.1f}/{rtts[len(rtts) // 2]:.1f}/{rtts[-1]:.1f} ms"
        )
    return 0 if rtts else 1


def cmd_logs(args: argparse.Namespace) -> int:
    """The agent's recent log lines over MQTT; -f keeps polling for new ones."""
    try:
        session = _session(args)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    since, printed = 0, []
    try:
        while True:
            reply = session.call(args.device, "logs", Logs(since, args.lines), timeout_s=args.timeout)
            if not reply.ok:
                return output.fail(
                    f"{args.device}: {reply.error_code}: {reply.error_message}",
                    code=reply.error_code or "error",
                    as_json=args.json,
                )
            result = reply.result or {}
            for line in result.get("lines", []):
                if args.json:
                    printed.append(line)
                else:
                    print(line["text"], flush=True)
            since = result.get("next", since)
            if not args.follow:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    if args.json:
        output.print_json({"device_id": args.device, "lines": printed, "next": since})
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "devices",
        help="list devices: state, architecture, runtime, can-train, last seen",
        description="Probe the fleet (agents answer by re-announcing) and list every device. "
        "States: online, busy, stale (no heartbeat for 3 intervals / no answer to the probe), "
        "offline (said goodbye or its Will fired).",
    )
    _common(p)
    p.add_argument("--wait", type=float, default=2.0, help="seconds to wait for agents to answer the probe (default 2)")
    p.add_argument("--caps", action="store_true", help="also print each device's capabilities")
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_devices)
    ds = p.add_subparsers(dest="devices_cmd", metavar="{forget}")
    q = ds.add_parser(
        "forget",
        help="drop a removed device: clear its retained status and capabilities on the "
        "broker and remove it from the registry",
    )
    q.add_argument("device", type=_device_id, help="device id")
    _common(q)
    q.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    q.set_defaults(func=cmd_devices_forget)
    p = sub.add_parser("ping", help="round-trip a command to a device and print the latency")
    _common(p)
    p.add_argument("--device", required=True, type=_device_id, help="device id")
    p.add_argument("--count", type=int, default=3, help="number of pings (default 3)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between pings")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reply")
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_ping)
    p = sub.add_parser(
        "logs",
        help="an agent's recent log lines, over MQTT (-f: follow)",
        description="Print the device agent's recent log lines (kept in memory on the device, "
        "bounded to 2,000 lines / 512 KB); -f polls for new ones until Ctrl-C.",
    )
    p.add_argument("device", type=_device_id, help="device id")
    _common(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--lines", type=int, default=200, help="most lines per request (default: %(default)s)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls with -f (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the device (default: %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_logs)
