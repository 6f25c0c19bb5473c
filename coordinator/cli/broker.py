"""`edgeprune` commands: an MQTT broker for the fleet, and its certificates. Each command's flags sit beside its handler."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import output
from ..store import default_home
from .common import _common


def cmd_broker(args: argparse.Namespace) -> int:
    from .. import broker, pki

    home = Path(args.home) if args.home else default_home()
    if args.secure:
        if args.embedded:
            return output.fail(
                "--secure needs Mosquitto; the embedded broker has no TLS, certificates or ACL",
                code="usage",
                as_json=args.json,
                status=2,
            )
        if broker.mosquitto_path() is None:
            return output.fail(
                "--secure needs Mosquitto (apt-get install mosquitto)", code="no_mosquitto", as_json=args.json
            )
        if pki.identity(home) is None:
            return output.fail(
                f"no fleet CA in {pki.pki_dir(home)}: run `edgeprune pki init` first", code="no_pki", as_json=args.json
            )
        args.persistence = True  # survive a broker restart mid-round
        args.port = args.port if args.port != 1883 else 8883
    else:
        broker.warn_if_exposed(args.host)
    kind = "embedded" if args.embedded else ("mosquitto" if broker.mosquitto_path() else "embedded")
    url = f"{'mqtts' if args.secure else 'mqtt'}://{args.host}:{args.port}"
    if not 0 < args.port < 65536:
        return output.fail(f"--port {args.port}: must be in 1..65535", code="usage", as_json=args.json, status=2)
    busy = broker.port_problem(args.host, args.port)
    if busy:  # say so before announcing anything: a script must not read a success line first
        return output.fail(busy, code="port_in_use", as_json=args.json, status=2)
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
        f.write(
            broker.mosquitto_config(
                args.host, args.port, Path(workdir), args.persistence, pki.pki_dir(home) if args.secure else None
            )
        )
    os.execv(broker.mosquitto_path(), [broker.mosquitto_path(), "-c", conf])
    return 0  # not reached


def cmd_pki(args: argparse.Namespace) -> int:
    from .. import pki

    home = Path(args.home) if args.home else default_home()
    try:
        if args.pki_cmd == "init":
            out = pki.init(home, args.broker_name, force=args.force)
            msg = (
                f"fleet CA, broker and coordinator certificates in {out['dir']}\n"
                f"broker certificate valid for: {', '.join(out['broker_names'])}\n"
                f"next: edgeprune broker --secure --host 0.0.0.0; edgeprune pki issue DEVICE_ID"
            )
        else:
            ident = pki.issue(home, args.device_id)
            out = {"device_id": args.device_id, **{k: str(v) for k, v in ident.__dict__.items()}}
            msg = (
                f"certificate for {args.device_id}: {ident.cert} (key {ident.key}); `edgeprune flash` installs it "
                f"when --broker is mqtts://"
            )
    except pki.PkiError as exc:
        return output.fail(str(exc), code="pki", as_json=args.json)
    if args.json:
        output.print_json(out)
    else:
        print(msg)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "broker",
        help="run an MQTT broker (Mosquitto if installed, else embedded amqtt)",
        description="Run an MQTT broker in the foreground: Mosquitto with a generated config when "
        "`mosquitto` is installed, otherwise the embedded pure-Python amqtt broker.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others get a warning: no TLS)"
    )
    p.add_argument("--port", type=int, default=1883, help="port (default 1883)")
    p.add_argument(
        "--embedded", action="store_true", help="use the embedded amqtt broker even if Mosquitto is installed"
    )
    p.add_argument(
        "--persistence", action="store_true", help="Mosquitto: keep retained messages and sessions across restarts"
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="Mosquitto with TLS (default port 8883), client certificates from `edgeprune pki`, no anonymous "
        "clients, and an ACL: each device reads/writes only its own topics; only the coordinator "
        "sends commands and models. Persistence on.",
    )
    _common(p, broker=False)
    p.set_defaults(func=cmd_broker)
    p = sub.add_parser(
        "pki",
        help="fleet certificates: a CA, the broker's, the coordinator's, one per device",
        description="A small CA for TLS with per-device identities (ECDSA P-256, keys 0600, in "
        "<home>/pki). A certificate's CN is the MQTT user name the broker's ACL uses.",
    )
    pki_sub = p.add_subparsers(dest="pki_cmd", required=True)
    q = pki_sub.add_parser("init", help="create the CA and the broker and coordinator certificates")
    q.add_argument(
        "--broker-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or IP address devices use to reach the broker (repeatable; localhost and this "
        "host's name are always included)",
    )
    q.add_argument(
        "--force", action="store_true", help="replace an existing CA (every issued certificate stops working)"
    )
    _common(q, broker=False)
    q.set_defaults(func=cmd_pki)
    q = pki_sub.add_parser("issue", help="issue a device certificate (CN = device id)")
    q.add_argument("device_id")
    _common(q, broker=False)
    q.set_defaults(func=cmd_pki)
