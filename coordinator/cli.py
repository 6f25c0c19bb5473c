"""``edgeprune``: the coordinator command line.

Each subcommand is a small function here; the work lives in the module named
after its concept (session, rounds, export, bench, report...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from edge_agent.protocol.constants import DEFAULT_CHUNK_BYTES, IMPORTANCE_METHODS

from . import __version__, output
from .store import Store, default_home

DESCRIPTION = """\
edgeprune: pruning-aware federated learning and on-device benchmarking for
fleets of Raspberry-Pi-class devices, over MQTT.

  edgeprune broker              run an MQTT broker for the fleet (Mosquitto, or embedded)
  edgeprune flash USER@HOST     install the agent on a device over SSH (--bundle: offline bundle)
  edgeprune unflash USER@HOST   remove it again
  edgeprune devices             list the fleet's devices, their state and capabilities
  edgeprune ping --device ID    round-trip a command to one device
  edgeprune train               federated pruning-aware training over the fleet
  edgeprune runs                list runs;  edgeprune show RUN  prints one
  edgeprune export RUN          TFLite artifacts: dense, sparse, sparse-int8, fp16 (+ --qat)
  edgeprune bench --model RUN   benchmark the artifacts on the devices
  edgeprune report RUN          terminal summary and a self-contained HTML report
  edgeprune simulate --devices N   N simulated agents (real agent code, synthetic trainer) for scale tests

Common settings come from flags or EDGEPRUNE_BROKER, EDGEPRUNE_FLEET,
EDGEPRUNE_HOME. Every command takes --json for scripts.
"""


def _common(p: argparse.ArgumentParser, broker: bool = True) -> None:
    if broker:
        p.add_argument("--broker", type=_broker_urls, default=_default("broker", "EDGEPRUNE_BROKER", "mqtt://127.0.0.1:1883"),
                       help="MQTT broker URL; several, comma-separated, are tried in order (failover) "
                            "[env EDGEPRUNE_BROKER or edgeprune.toml; default %(default)s]")
        p.add_argument("--username", default=_default("username", "EDGEPRUNE_USERNAME", None),
                       help="MQTT user name [env EDGEPRUNE_USERNAME; default none]; the password comes from "
                            "EDGEPRUNE_PASSWORD or --password-file, never from a flag")
        p.add_argument("--password-file", default=_default("password_file", "EDGEPRUNE_PASSWORD_FILE", None),
                       help="file whose first line is the MQTT password, mode 0600 [env EDGEPRUNE_PASSWORD_FILE; "
                            "default none]")
        p.add_argument("--plain-password", action="store_true",
                       help="allow the password over plain TCP (mqtt://) to a non-loopback broker [default: refused]")
        p.add_argument("--fleet", type=_fleet_id, default=_default("fleet", "EDGEPRUNE_FLEET", "default"),
                       help="fleet name [env EDGEPRUNE_FLEET or edgeprune.toml; default %(default)s]")
    p.add_argument("--home", default=_default("home", "EDGEPRUNE_HOME", None),
                   help="coordinator home: database, runs, artifacts [env EDGEPRUNE_HOME or edgeprune.toml; "
                        "default ~/.local/share/edgeprune]")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")


CONFIG_KEYS = ("broker", "fleet", "home", "username", "password_file")
"""What `edgeprune.toml` may set (flags and EDGEPRUNE_* variables win over it)."""


def config_file() -> tuple[Path | None, dict]:
    """``./edgeprune.toml``, else ``<home>/edgeprune.toml``: the settings a user would retype every time."""
    import tomllib

    home = Path(os.environ.get("EDGEPRUNE_HOME") or default_home())
    for path in (Path.cwd() / "edgeprune.toml", home / "edgeprune.toml"):
        if path.is_file():
            try:
                table = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise UsageError(f"{path}: {exc}") from None
            table = table.get("coordinator", table)
            unknown = sorted(set(table) - set(CONFIG_KEYS))
            if unknown:
                raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}")
            bad = [k for k, v in table.items() if not isinstance(v, str)]
            if bad:
                raise UsageError(f"{path}: {', '.join(bad)} must be strings")
            return path, table
    return None, {}


_CONFIG: dict = {}


def _default(key: str, env: str, fallback):
    """Environment first, then the config file, then the built-in default."""
    return os.environ.get(env) or _CONFIG.get(key) or fallback


def _store(args: argparse.Namespace) -> Store:
    return Store(args.home or default_home())


class UsageError(ValueError):
    """A bad flag or setting value: exit 2 with one line, not a traceback."""


class _DefaultsMixin:
    """Every option with a default says it in --help, taken from the parser (so it cannot drift)."""

    def _get_help_string(self, action):  # type: ignore[no-untyped-def]
        text = action.help or ""
        if ("%(default)" not in text and "default" not in text and action.default not in (None, False, [])
                and action.default is not argparse.SUPPRESS and action.option_strings):
            text += " (default: %(default)s)"
        return text


class HelpFormatter(_DefaultsMixin, argparse.HelpFormatter):
    pass


class RawHelpFormatter(_DefaultsMixin, argparse.RawDescriptionHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a :class:`UsageError` (so ``--json`` gets the one error shape)."""

    def __init__(self, *a, **kw):
        if kw.get("formatter_class") in (None, argparse.HelpFormatter):
            kw["formatter_class"] = HelpFormatter
        elif kw["formatter_class"] is argparse.RawDescriptionHelpFormatter:
            kw["formatter_class"] = RawHelpFormatter
        super().__init__(*a, **kw)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (try {self.prog} --help)")


def _device_id(value: str) -> str:
    from edge_agent.protocol.topics import ID_RE

    if not ID_RE.match(value):
        raise argparse.ArgumentTypeError(f"invalid device id {value!r}: use 1-64 characters from [A-Za-z0-9_-]")
    return value


def _fleet_id(value: str) -> str:
    from edge_agent.protocol.topics import ID_RE

    if not ID_RE.match(value):
        raise argparse.ArgumentTypeError(f"invalid fleet {value!r}: use 1-64 characters from [A-Za-z0-9_-]")
    return value


def _broker_urls(value: str) -> str:
    from edge_agent.link import parse_broker_urls

    try:
        parse_broker_urls(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _credentials(args: argparse.Namespace) -> dict:
    """Session keyword arguments for password authentication (raises ValueError with the fix)."""
    from edge_agent.settings import SettingsError, read_secret

    password = os.environ.get("EDGEPRUNE_PASSWORD")
    if getattr(args, "password_file", None):
        try:
            password = read_secret(args.password_file, "--password-file")
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
    username = getattr(args, "username", None)
    if password and not username:
        raise ValueError("a password is set (EDGEPRUNE_PASSWORD or --password-file) but no --username")
    return {"username": username, "password": password,
            "force_plain_password": bool(getattr(args, "plain_password", False))}


def _session(args: argparse.Namespace, long_running: bool = False):
    from .session import Session

    try:
        session = Session(args.broker, args.fleet, _store(args), long_running=long_running,
                          chunk_bytes=getattr(args, "chunk_bytes", DEFAULT_CHUNK_BYTES), **_credentials(args))
    except ValueError as exc:  # broker URLs, credentials: the user's to fix
        raise UsageError(str(exc)) from None
    return session.start(args.connect_timeout)


# -- broker ------------------------------------------------------------------

def cmd_broker(args: argparse.Namespace) -> int:
    from . import broker, pki

    home = Path(args.home) if args.home else default_home()
    if args.secure:
        if args.embedded:
            return output.fail("--secure needs Mosquitto; the embedded broker has no TLS, certificates or ACL",
                               code="usage", as_json=args.json, status=2)
        if broker.mosquitto_path() is None:
            return output.fail("--secure needs Mosquitto (apt-get install mosquitto)", code="no_mosquitto", as_json=args.json)
        if pki.identity(home) is None:
            return output.fail(f"no fleet CA in {pki.pki_dir(home)}: run `edgeprune pki init` first",
                               code="no_pki", as_json=args.json)
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
        f.write(broker.mosquitto_config(args.host, args.port, Path(workdir), args.persistence,
                                        pki.pki_dir(home) if args.secure else None))
    os.execv(broker.mosquitto_path(), [broker.mosquitto_path(), "-c", conf])
    return 0  # not reached


# -- pki ---------------------------------------------------------------------

def cmd_pki(args: argparse.Namespace) -> int:
    from . import pki

    home = Path(args.home) if args.home else default_home()
    try:
        if args.pki_cmd == "init":
            out = pki.init(home, args.broker_name, force=args.force)
            msg = (f"fleet CA, broker and coordinator certificates in {out['dir']}\n"
                   f"broker certificate valid for: {', '.join(out['broker_names'])}\n"
                   f"next: edgeprune broker --secure --host 0.0.0.0; edgeprune pki issue DEVICE_ID")
        else:
            ident = pki.issue(home, args.device_id)
            out = {"device_id": args.device_id, **{k: str(v) for k, v in ident.__dict__.items()}}
            msg = (f"certificate for {args.device_id}: {ident.cert} (key {ident.key}); `edgeprune flash` installs it "
                   f"when --broker is mqtts://")
    except pki.PkiError as exc:
        return output.fail(str(exc), code="pki", as_json=args.json)
    if args.json:
        output.print_json(out)
    else:
        print(msg)
    return 0


# -- devices -----------------------------------------------------------------

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
        print(f"no devices in fleet {args.fleet!r} at {args.broker}"
              + (f"; fleets on this broker: {others} (--fleet NAME)" if others else "; no fleet has devices there"))
        return 0
    output.table(f"fleet {args.fleet} ({sum(r['state'] in ('online', 'busy') for r in rows)}/{len(rows)} online)",
                 ["device", "state", "arch", "runtime", "can train", "last seen"],
                 [[r["device_id"], r["state"] + (f" ({r['task']})" if r.get("task") else ""), r["arch"],
                   f"{r['runtime']} {r['runtimes'][r['runtime']]}" if r["runtime"] else "none",
                   _can_train_text(r), output.ago(r["last_seen"])] for r in rows])
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
            return output.fail(f"no device {args.device!r} in fleet {args.fleet!r}", code="not_found", as_json=args.json)
        if rows[args.device]["state"] in ("online", "busy"):
            return output.fail(f"{args.device} is {rows[args.device]['state']}: stop its agent (or unflash it) first, "
                               f"or it re-announces itself at once", code="busy", as_json=args.json)
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
        session.discover(1.0)
        known = {r["device_id"]: r for r in session.fleet_rows()}
        if args.device not in known:
            ids = ", ".join(sorted(known)) or "none"
            return output.fail(f"{args.device} has never been seen in fleet {args.fleet!r} (devices there: {ids})",
                               code="not_found", as_json=args.json)
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


# -- logs / watch / completion ---------------------------------------------------

def cmd_logs(args: argparse.Namespace) -> int:
    """The agent's recent log lines over MQTT; -f keeps polling for new ones."""
    try:
        session = _session(args)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    since, printed = 0, []
    try:
        while True:
            reply = session.call(args.device, "logs", {"since": since, "lines": args.lines}, timeout_s=args.timeout)
            if not reply.ok:
                return output.fail(f"{args.device}: {reply.error_code}: {reply.error_message}",
                                   code=reply.error_code or "error", as_json=args.json)
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


def cmd_watch(args: argparse.Namespace) -> int:
    """A running job from another terminal: its rounds as they are recorded, and the fleet's states
    (from the coordinator home's store, which the training process writes)."""
    from .progress import Reporter
    from .store import RunNotFound

    store = _store(args)
    reporter = Reporter(quiet=args.json)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            run = store.resolve_run(args.run, kind="train")
            break
        except RunNotFound as exc:
            if args.run != "latest" or time.monotonic() > deadline:
                return output.fail(str(exc), code="not_found", as_json=args.json)
            time.sleep(1.0)
    reporter.say(f"watching run {run['run_id']} ({run['state']}) on fleet {run['fleet']}; Ctrl-C stops watching "
                 f"(not the run)")
    seen, fleet_state = 0, None
    reporter.round_header()
    try:
        while True:
            rows = store.rounds(run["run_id"])
            for row in rows[seen:]:
                if args.json:
                    print(json.dumps(row, default=str), flush=True)
                else:
                    reporter.round_done(row)
            seen = len(rows)
            states = {d["device_id"]: d["state"] for d in store.devices(run["fleet"])}
            if states != fleet_state and not args.json:
                counts: dict[str, int] = {}
                for st in states.values():
                    counts[st] = counts.get(st, 0) + 1
                reporter.say("fleet: " + ", ".join(f"{n} {st}" for st, n in sorted(counts.items())))
                fleet_state = states
            run = store.resolve_run(run["run_id"])
            if run["state"] != "running":
                reporter.say(f"run {run['run_id']} {run['state']}")
                return 0 if run["state"] == "done" else 1
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash (or zsh, through bashcompinit) completion function for every subcommand and flag."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, sp in sorted(subs.choices.items()):
        words = sorted({o for a in sp._actions for o in a.option_strings if o.startswith("--")})
        nested = next((a for a in sp._actions if isinstance(a, argparse._SubParsersAction)), None)
        words += sorted(nested.choices) if nested else []
        cases.append(f'    {name}) words="{" ".join(words)}" ;;')
    script = "\n".join([
        "# edgeprune completion: eval \"$(edgeprune completion %s)\"" % shell,
        "_edgeprune() {",
        '  local cur="${COMP_WORDS[COMP_CWORD]}" cmd="${COMP_WORDS[1]}" words',
        "  if [ \"$COMP_CWORD\" -eq 1 ]; then",
        f'    COMPREPLY=($(compgen -W "{" ".join(sorted(subs.choices))} --help --version" -- "$cur")); return',
        "  fi",
        '  case "$cmd" in',
        *cases,
        '    *) words="" ;;',
        "  esac",
        '  COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "}",
        "complete -o default -F _edgeprune edgeprune",
    ])
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script + "\n"


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion_script(build_parser(), args.shell))
    return 0


# -- flash / unflash -----------------------------------------------------------

def _ssh_arguments(p: argparse.ArgumentParser) -> None:
    """The SSH flags flash and unflash share (read back by _ssh)."""
    p.add_argument("--identity", help="SSH private key file (default: your SSH config and agent)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                   help="extra ssh -o option, repeatable (e.g. UserKnownHostsFile=/tmp/kh)")
    p.add_argument("--ssh-timeout", type=float, default=10.0, help="SSH connect timeout in seconds (default 10)")


def _ssh(args: argparse.Namespace):
    from .flash import Ssh, Target

    target = Target.parse(args.target)
    return target, Ssh(target, args.identity, args.ssh_option, args.ssh_timeout)


def cmd_flash(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import bundle
    from .flash import FlashError, flash, undo_after_timeout, wait_online
    from .progress import Reporter

    say = Reporter(quiet=args.json).say
    home = Path(args.home) if args.home else default_home()
    if args.bundle:  # only write the bundle: for devices without network, installed by hand
        if args.target:
            return output.fail("give either a TARGET to flash or --bundle OUT, not both", code="usage", as_json=args.json, status=2)
        try:
            platform = bundle.Platform.parse(args.arch, args.python_version, args.glibc)
            manifest = bundle.build(platform, Path(args.bundle), train=args.train, offline=args.offline, say=say)
        except bundle.BundleError as exc:
            return output.fail(str(exc), code=exc.code, as_json=args.json)
        if args.json:
            output.print_json(manifest)
        else:
            print(f"wrote {args.bundle}: {len(manifest['wheels'])} wheels for {platform.arch} / Python "
                  f"{platform.python}, {manifest['bundle_bytes'] / 1e6:.1f} MB\n"
                  f"on the device: tar xzf {Path(args.bundle).name} && sh {manifest['dir']}/install.sh "
                  f"--device-id ID --broker mqtt://LAPTOP:1883")
        return 0
    if not args.target or not args.device_id:
        return output.fail("flash needs TARGET and --device-id (or --bundle OUT to only write a bundle)",
                           code="usage", as_json=args.json, status=2)
    try:
        target, ssh = _ssh(args)
        done = flash(target, ssh, device_id=args.device_id, broker_url=args.broker, fleet=args.fleet, home=home,
                     python=args.remote_python, data=args.data, train=args.train, reinstall=args.reinstall,
                     offline=args.offline, from_bundle=Path(args.from_bundle) if args.from_bundle else None,
                     extra_settings=args.set, device_username=args.device_username,
                     device_password_file=Path(args.device_password_file) if args.device_password_file else None,
                     say=say)
    except FlashError as exc:
        return output.fail(str(exc), code=exc.code, as_json=args.json)
    install = done["install"]
    say(f"      {install.get('service_detail')}")
    for note in install.get("notes") or []:
        say(f"      note: {note}")
    say(f"[5/5] waiting for {args.device_id} to come online on {args.local_broker or args.broker}")
    from .session import Session

    try:
        session = Session(args.local_broker or args.broker, args.fleet, _store(args),
                          **_credentials(args)).start(args.connect_timeout)
    except ConnectionError as exc:
        return output.fail(f"the agent is installed, but this laptop cannot reach the broker to confirm it: {exc}",
                           code="connect", as_json=args.json)
    try:
        caps = wait_online(session, args.device_id, args.online_timeout)
    finally:
        session.close()
    if caps is None:
        try:
            undone = undo_after_timeout(ssh, install.get("first_install", True))
        except FlashError as exc:
            undone = f"then failed to undo it: {exc}"
        return output.fail(f"{args.device_id} was installed but did not come online within {args.online_timeout:.0f} s, "
                           f"so flash {undone}. Check that the device reaches {args.broker} with the fleet's "
                           f"credentials; the agent's log: {install.get('service_detail')}",
                           code="not_online", as_json=args.json)
    done["caps"] = caps
    if args.json:
        output.print_json(done)
        return 0
    verb = "upgraded" if install.get("upgraded") else ("re-flashed" if not install.get("first_install") else "flashed")
    print(f"{args.device_id} {verb} and online in fleet {args.fleet}: {caps.get('arch')}, Python "
          f"{caps.get('python_version')}, agent {caps.get('agent_version')}")
    _print_caps([{"device_id": args.device_id, "caps": caps}])
    return 0


def cmd_unflash(args: argparse.Namespace) -> int:
    from .flash import FlashError, unflash

    try:
        target, ssh = _ssh(args)
        result = unflash(ssh, keep_state=args.keep_state)
    except FlashError as exc:
        return output.fail(str(exc), code=exc.code, as_json=args.json)
    if args.device_id:  # forget it in the fleet too: clear its retained presence, drop it from the registry
        from .session import Session

        try:
            with Session(args.broker, args.fleet, _store(args), **_credentials(args)).start(args.connect_timeout) as session:
                # clear only once the agent's last word (its own "offline" or its Will) is in, or it would
                # land after the clear and bring the device back as a retained ghost
                session.discover(1.0)
                session.wait_for(lambda rows: all(r["device_id"] != args.device_id or r["state"] == "offline"
                                                  for r in rows), 30)
                session.clear_device(args.device_id)
            result["forgotten"] = args.device_id
        except (ConnectionError, RuntimeError, OSError) as exc:  # the device is gone either way
            result["forget_error"] = f"{type(exc).__name__}: {exc}"
    if args.json:
        output.print_json(result)
    elif result.get("not_installed"):
        print(f"{target}: no edgeprune agent installed; nothing to remove")
    else:
        print(f"removed the edgeprune agent from {target}: " + ", ".join(result.get("removed", [])))
        if result.get("forget_error"):
            print(f"could not clear {args.device_id} from the fleet: {result['forget_error']}")
    return 0


# -- train / runs / show -------------------------------------------------------

TRAIN_FLAGS = {  # flag dest -> TrainConfig field, for --resume's conflict check
    "model": "model", "rounds": "rounds", "sparsity": "sparsity", "schedule": "schedule",
    "ramp_fraction": "ramp_fraction", "clients_per_round": "clients_per_round", "fraction": "fraction",
    "min_clients": "min_clients", "local_epochs": "local_epochs", "batch_size": "batch_size", "lr": "lr",
    "optimizer": "optimizer", "granularity": "granularity", "mask_policy": "mask_policy",
    "update_format": "update_format", "regrow": "regrow", "seed": "seed", "eval_data": "eval_data",
    "input_shape": "input_shape", "num_classes": "num_classes", "aggregation": "aggregation", "trim": "trim",
    "clip_norm": "clip_norm", "max_norm_ratio": "max_norm_ratio", "structured": "structured",
    "structured_every": "structured_every", "importance": "importance", "devices": "devices",
}
RESUME_MAY_CHANGE = {"round_timeout": "round_timeout_s", "wait_for": "wait_for_devices", "wait_timeout": "wait_timeout_s"}


def _train_config(args: argparse.Namespace):
    from .rounds import TrainConfig

    return TrainConfig(
        model=args.model, rounds=args.rounds, sparsity=args.sparsity, schedule=args.schedule,
        ramp_fraction=args.ramp_fraction, clients_per_round=args.clients_per_round, fraction=args.fraction,
        min_clients=args.min_clients, local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, granularity=args.granularity, mask_policy=args.mask_policy,
        update_format=args.update_format, regrow=args.regrow, round_timeout_s=args.round_timeout, seed=args.seed,
        eval_data=args.eval_data, input_shape=tuple(args.input_shape) if args.input_shape else None,
        num_classes=args.num_classes, devices=args.devices.split(",") if args.devices else None,
        wait_for_devices=args.wait_for, wait_timeout_s=args.wait_timeout, aggregation=args.aggregation,
        trim=args.trim, clip_norm=args.clip_norm, max_norm_ratio=args.max_norm_ratio, structured=args.structured,
        structured_every=args.structured_every, importance=args.importance)


def _resume_setup(args: argparse.Namespace):
    """The stored run's config, fleet and broker; a flag typed now that contradicts them is refused."""
    from .rounds import resume_config

    cfg, rec = resume_config(_store(args), args.resume)
    typed = _train_config(args)
    for dest, field_name in TRAIN_FLAGS.items():
        if dest in args.explicit and getattr(typed, field_name) != getattr(cfg, field_name):
            raise UsageError(f"--{dest.replace('_', '-')} {getattr(typed, field_name)!r} contradicts run "
                             f"{rec['run_id']}, which has {getattr(cfg, field_name)!r}; a resumed run keeps its "
                             f"settings (drop the flag)")
    for dest, field_name in RESUME_MAY_CHANGE.items():
        if dest in args.explicit:
            setattr(cfg, field_name, getattr(typed, field_name))
    stored = {"fleet": rec["fleet"], "broker": rec["config"].get("broker")}
    for key, value in stored.items():
        if value is None:
            continue
        if key in args.explicit and getattr(args, key) != value:
            raise UsageError(f"--{key} {getattr(args, key)} contradicts run {rec['run_id']}, which ran on {key} "
                             f"{value}; drop --{key} to resume it there")
        setattr(args, key, value)
    return cfg, rec


def cmd_train(args: argparse.Namespace) -> int:
    from .progress import Reporter
    from .rounds import NoDevices, train
    from .store import RunNotFound

    resume = None
    try:
        if args.resume:  # the run's own config, fleet and broker
            cfg, rec = _resume_setup(args)
            resume = rec["run_id"]
        else:
            cfg = _train_config(args)
        cfg.validate()
    except (ValueError, RunNotFound) as exc:
        return output.fail(str(exc), code="usage" if isinstance(exc, (UsageError, RunNotFound)) else "bad_args",
                           as_json=args.json, status=2)
    try:
        session = _session(args, long_running=True)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    reporter = Reporter(quiet=args.json)
    try:
        session.discover(1.0)
        summary = train(cfg, session, session.store, reporter, resume=resume)
    except NoDevices as exc:
        return output.fail(str(exc), code="no_devices", as_json=args.json)
    except ValueError as exc:
        return output.fail(str(exc), code="bad_args", as_json=args.json, status=2)
    except KeyboardInterrupt:
        runs = session.store.runs("train")
        rid = resume or (runs[0]["run_id"] if runs and runs[0]["state"] == "interrupted" else None)
        hint = f"; continue with: edgeprune train --resume {rid}" if rid else ""
        return output.fail(f"interrupted; the rounds so far are saved{hint}", code="interrupted", as_json=args.json,
                           status=130)
    finally:
        session.close()
    if summary["state"] != "done":
        err = summary.get("error") or {"code": summary["state"], "message": f"run {summary['run_id']} {summary['state']}"}
        if args.json:
            output.print_json({**output.error_obj(err["code"], err["message"]), "run": summary,
                               "rounds": session.store.rounds(summary["run_id"])})
        else:
            reporter.say(f"run {summary['run_id']} FAILED: {err['message']}")
        return 1
    if args.json:
        rounds = session.store.rounds(summary["run_id"])
        output.print_json({**summary, "rounds": rounds})
    else:
        acc = summary["final_accuracy"]
        reporter.say(f"run {summary['run_id']} {summary['state']}: accuracy "
                     f"{(acc * 100 if acc is not None else float('nan')):.2f}%, sparsity {summary['final_sparsity'] or 0:.1%}, "
                     f"upload {output.human_bytes(summary['upload_bytes_per_client_round'])}/client-round "
                     f"({(summary['ratio_vs_dense_fp32'] or 0):.1f}x below dense fp32), {summary['total_wall_s']:.1f} s")
        reporter.say(f"model and TensorBoard logs: {summary['run_dir']}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    runs = _store(args).runs()
    if args.json:
        output.print_json(runs)
        return 0
    output.table("runs", ["run", "kind", "fleet", "state", "created", "rounds", "accuracy", "sparsity"],
                 [[r["run_id"], r["kind"], r["fleet"], r["state"], time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])),
                   (r["summary"] or {}).get("rounds_done", "-"),
                   f"{r['summary']['final_accuracy'] * 100:.2f}%" if (r["summary"] or {}).get("final_accuracy") is not None else "-",
                   f"{r['summary']['final_sparsity']:.1%}" if (r["summary"] or {}).get("final_sparsity") is not None else "-"]
                  for r in runs])
    return 0


def _find_run(args: argparse.Namespace, ref: str):
    from .store import RunNotFound

    try:
        return _store(args).resolve_run(ref), None
    except RunNotFound as exc:
        return None, output.fail(str(exc), code="not_found", as_json=args.json)


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    run, rc = _find_run(args, args.run)
    if run is None:
        return rc
    if run["kind"] == "bench":  # a bench id: its results, not a training run's fields
        from .report import print_bench

        results = store.bench_results(bench_id=run["run_id"])
        if args.json:
            output.print_json({**run, "results": results})
        else:
            print(f"bench {run['run_id']} ({run['state']}) on fleet {run['fleet']}"
                  + (f", artifacts of run {run['config'].get('run_id')}" if (run["config"] or {}).get("run_id") else ""))
            print_bench(results)
        return 0
    rounds = store.rounds(run["run_id"])
    clients = store.client_rounds(run["run_id"])
    if args.json:
        output.print_json({**run, "rounds": rounds, "client_rounds": clients})
        return 0
    cfg = run["config"]
    print(f"run {run['run_id']} ({run['kind']}, {run['state']}) on fleet {run['fleet']}")
    print(f"  model {cfg.get('model')}: {cfg.get('num_params', 0):,} parameters, target sparsity {cfg.get('sparsity', 0):.0%} "
          f"({cfg.get('schedule')}, {cfg.get('granularity')}, mask policy {cfg.get('mask_policy')})")
    dense = (cfg.get("layers") or {}).get("dense") or {}
    for layer, why in dense.items():
        print(f"  layer {layer} left dense: {why}")
    output.table("rounds", ["round", "clients", "accuracy", "loss", "sparsity", "up/client", "down/client", "up vs fp32", "wall s"],
                 [[f"{r['round']}" + ("" if r.get("applied", True) else " (not applied)"),
                   f"{r['clients_ok']}/{r['clients_selected']}",
                   f"{r['accuracy'] * 100:.2f}%" if r.get("accuracy") is not None else "-",
                   f"{r['loss']:.4f}" if r.get("loss") is not None else "-", f"{r['sparsity']:.2%}",
                   output.human_bytes(r.get("bytes_up_per_client")), output.human_bytes(r.get("bytes_down_per_client")),
                   f"{r['up_ratio_vs_dense_fp32']:.1f}x" if r.get("up_ratio_vs_dense_fp32") else "-", f"{r['wall_s']:.1f}"]
                  for r in rounds])
    failed = [c for c in clients if not c["ok"]]
    if failed:
        output.table("client failures", ["round", "device", "error"], [[c["round"], c["device_id"], c["error"]] for c in failed])
    if run["summary"]:
        if (run["summary"].get("error") or {}).get("message"):
            print(f"  FAILED: {run['summary']['error']['message']}")
        print(f"  run dir: {run['summary'].get('run_dir')}")
    return 0


def cmd_runs_rm(args: argparse.Namespace) -> int:
    import shutil

    store = _store(args)
    run, rc = _find_run(args, args.run)
    if run is None:
        return rc
    if run["state"] == "running" and not args.force:
        return output.fail(f"run {run['run_id']} is marked running (a coordinator may still be training it); "
                           f"--force removes it anyway", code="busy", as_json=args.json)
    run_dir = store.home / "runs" / run["run_id"]
    store.delete_run(run["run_id"])
    shutil.rmtree(run_dir, ignore_errors=True)
    if args.json:
        output.print_json({"removed": run["run_id"], "run_dir": str(run_dir)})
    else:
        print(f"removed run {run['run_id']} and {run_dir}")
    return 0


# -- export / bench -----------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import export
    from .global_model import load_eval_data
    from .progress import Reporter
    from .rounds import new_run_id

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in export.FORMATS]
    if bad:
        return output.fail(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(export.FORMATS)}",
                           code="bad_args", as_json=args.json, status=2)
    store = _store(args)
    reporter = Reporter(quiet=args.json)
    try:
        model, run = export.resolve_model(store, args.model, args.prune, args.prune_policy, args.granularity)
        calib = load_eval_data(args.calibration_data or ((run or {}).get("config") or {}).get("eval_data") or "digits")
        qat = load_eval_data(args.qat_data) if args.qat else None
    except ValueError as exc:
        return output.fail(str(exc), code="bad_args", as_json=args.json, status=2)
    run_id = run["run_id"] if run else new_run_id()
    out = Path(args.out) if args.out else (Path(run["summary"]["run_dir"]) / "artifacts" if run
                                           else store.home / "exports" / run_id)
    recs = export.export(model, formats, out, calibration=calib, qat_data=qat, progress=reporter.say)
    if run is None:
        store.create_run(run_id, "-", "export", {"model": args.model, "formats": formats, "prune": args.prune,
                                                 "prune_policy": args.prune_policy})
        store.finish_run(run_id, "done", {"run_dir": str(out)})
    for r in recs:
        store.save_artifact(run_id, r)
    trained = ((run or {}).get("summary") or {}).get("final_sparsity")
    if args.json:
        output.print_json({"run_id": run_id, "trained_sparsity": trained, "artifacts": recs})
        return 0
    dense = next((r["bytes"] for r in recs if r["format"] == "dense"), None)
    output.table(f"artifacts of {run_id} in {out}", ["variant", "bytes", "gzip", "vs dense fp32", "sparsity read back",
                                                     "trained sparsity", "sha256"],
                 [[r["format"], f"{r['bytes']:,}", f"{r['gzip_bytes']:,}",
                   f"{dense / r['bytes']:.1f}x" if dense else "-", f"{r['sparsity']:.2%}",
                   f"{trained:.2%}" if trained is not None else "-", r["sha256"][:12]] for r in recs])
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench as bench_mod
    from .progress import Reporter

    reporter = Reporter(quiet=args.json)
    store = _store(args)
    try:
        artifacts, run_id = bench_mod.collect_artifacts(store, args.model, args.formats.split(","), reporter)
    except ValueError as exc:
        return output.fail(str(exc), code="bad_args", as_json=args.json, status=2)
    try:
        session = _session(args, long_running=True)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    try:
        rows = session.discover(args.wait)
        online = [r["device_id"] for r in rows if r["state"] in ("online", "busy")]
        devices = online if args.devices == "all" else [d for d in args.devices.split(",") if d]
        missing = [d for d in devices if d not in online]
        if missing:
            reporter.warn(f"not online, skipped: {', '.join(missing)}")
            devices = [d for d in devices if d in online]
        if not devices:
            if args.devices != "all" and online:
                why = f"none of {args.devices} is online in fleet {args.fleet!r}; online: {', '.join(online)}"
            else:
                seen = session.fleets_seen()
                why = (f"no online devices to benchmark in fleet {args.fleet!r}; fleets on this broker: "
                       + (", ".join(f"{f} ({n})" for f, n in seen.items()) or "none"))
            return output.fail(why, code="no_devices", as_json=args.json)
        summary = bench_mod.bench(session, store, artifacts, devices, run_id=run_id, threads=args.threads,
                                  runs=args.runs, duration_s=args.duration, warmup=args.warmup, budget_s=args.budget,
                                  runtime=args.runtime, parallel=args.parallel, reporter=reporter)
    finally:
        session.close()
    if args.json:
        output.print_json(summary)
        return 0
    from .report import print_bench

    print_bench(store.bench_results(bench_id=summary["bench_id"]))
    print(f"bench {summary['bench_id']} stored; `edgeprune report {run_id or summary['bench_id']}` for the report")
    return 0 if all("error" not in r for r in summary["devices"].values()) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from . import report

    store = _store(args)
    run, rc = _find_run(args, args.run)
    if run is None:
        return rc
    data = report.gather(store, run)
    if args.html:
        report.write_html(data, args.html)
    if args.json:
        output.print_json({**data, "html": args.html})
        return 0
    report.print_summary(data)
    if args.html:
        print(f"HTML report: {args.html}")
    return 0



# -- simulate -------------------------------------------------------------------

def cmd_simulate(args: argparse.Namespace) -> int:
    import json
    import math
    import shutil
    import signal
    import subprocess
    import tempfile

    from edge_agent.link import parse_broker_urls

    from .broker import wait_for_port

    if args.devices < 1 or (args.processes is not None and args.processes < 1) or args.delay < 0:
        return output.fail("--devices and --processes must be >= 1, --delay >= 0", code="usage", as_json=args.json,
                           status=2)
    try:
        addr = parse_broker_urls(args.broker)[0]
    except ValueError as exc:
        return output.fail(str(exc), code="usage", as_json=args.json, status=2)
    if addr.tls:
        return output.fail("simulate runs plain MQTT agents (no device certificates): use an mqtt:// broker",
                           code="usage", as_json=args.json, status=2)
    if not wait_for_port(addr.host, addr.port, 5.0):
        return output.fail(f"cannot reach the broker at {addr.host}:{addr.port} (start one: edgeprune broker)",
                           code="connect", as_json=args.json)
    procs_n = min(args.devices, args.processes or (os.cpu_count() or 1))
    per = math.ceil(args.devices / procs_n)
    root = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="edgeprune-sim-"))
    t0 = time.perf_counter()
    procs = []
    for i in range(procs_n):
        first, count = i * per, min(per, args.devices - i * per)
        if count <= 0:
            break
        cmd = [sys.executable, "-m", "edge_agent.simulate", "--broker", args.broker, "--fleet", args.fleet,
               "--prefix", args.prefix, "--first", str(first), "--count", str(count), "--delay", str(args.delay),
               "--samples", str(args.samples), "--state-root", str(root)]
        if args.heartbeat_s:
            cmd += ["--heartbeat-s", str(args.heartbeat_s)]
        if args.keepalive_s:
            cmd += ["--keepalive-s", str(args.keepalive_s)]
        if args.username:  # the password reaches the children through the environment, as it reached us
            cmd += ["--username", args.username]
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
    ready = {"event": "ready", "devices": args.devices, "processes": len(procs), "fleet": args.fleet,
             "broker": args.broker, "connected": sum(h["connected"] for h in hosts),
             "ready_s": round(time.perf_counter() - t0, 3), "pids": [p.pid for p in procs], "state_dir": str(root)}
    if args.json:
        print(json.dumps(ready), flush=True)
    else:
        print(f"{ready['connected']}/{args.devices} simulated agents connected in {ready['ready_s']:.1f} s "
              f"({len(procs)} processes, fleet {args.fleet!r}, ids {args.prefix}-00000...); Ctrl-C stops them",
              flush=True)
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
        return output.fail(f"a simulator process ({died.pid}) exited with code {died.returncode}", code="died",
                           as_json=args.json)
    if args.json:
        print(json.dumps({"event": "stopped", "devices": args.devices}), flush=True)
    return 0 if ready["connected"] == args.devices else 1


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edgeprune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run an MQTT broker (Mosquitto if installed, else embedded amqtt)",
                       description="Run an MQTT broker in the foreground: Mosquitto with a generated config when "
                                   "`mosquitto` is installed, otherwise the embedded pure-Python amqtt broker.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others get a warning: no TLS)")
    p.add_argument("--port", type=int, default=1883, help="port (default 1883)")
    p.add_argument("--embedded", action="store_true", help="use the embedded amqtt broker even if Mosquitto is installed")
    p.add_argument("--persistence", action="store_true", help="Mosquitto: keep retained messages and sessions across restarts")
    p.add_argument("--secure", action="store_true",
                   help="Mosquitto with TLS (default port 8883), client certificates from `edgeprune pki`, no anonymous "
                        "clients, and an ACL: each device reads/writes only its own topics; only the coordinator "
                        "sends commands and models. Persistence on.")
    _common(p, broker=False)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("pki", help="fleet certificates: a CA, the broker's, the coordinator's, one per device",
                       description="A small CA for TLS with per-device identities (ECDSA P-256, keys 0600, in "
                                   "<home>/pki). A certificate's CN is the MQTT user name the broker's ACL uses.")
    pki_sub = p.add_subparsers(dest="pki_cmd", required=True)
    q = pki_sub.add_parser("init", help="create the CA and the broker and coordinator certificates")
    q.add_argument("--broker-name", action="append", default=[], metavar="NAME",
                   help="a host name or IP address devices use to reach the broker (repeatable; localhost and this "
                        "host's name are always included)")
    q.add_argument("--force", action="store_true", help="replace an existing CA (every issued certificate stops working)")
    _common(q, broker=False)
    q.set_defaults(func=cmd_pki)
    q = pki_sub.add_parser("issue", help="issue a device certificate (CN = device id)")
    q.add_argument("device_id")
    _common(q, broker=False)
    q.set_defaults(func=cmd_pki)

    p = sub.add_parser("devices", help="list devices: state, architecture, runtime, can-train, last seen",
                       description="Probe the fleet (agents answer by re-announcing) and list every device. "
                                   "States: online, busy, stale (no heartbeat for 3 intervals / no answer to the probe), "
                                   "offline (said goodbye or its Will fired).")
    _common(p)
    p.add_argument("--wait", type=float, default=2.0, help="seconds to wait for agents to answer the probe (default 2)")
    p.add_argument("--caps", action="store_true", help="also print each device's capabilities")
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_devices)
    ds = p.add_subparsers(dest="devices_cmd", metavar="{forget}")
    q = ds.add_parser("forget", help="drop a removed device: clear its retained status and capabilities on the "
                                     "broker and remove it from the registry")
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

    p = sub.add_parser("logs", help="an agent's recent log lines, over MQTT (-f: follow)",
                       description="Print the device agent's recent log lines (kept in memory on the device, "
                                   "bounded to 2,000 lines / 512 KB); -f polls for new ones until Ctrl-C.")
    p.add_argument("device", type=_device_id, help="device id")
    _common(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--lines", type=int, default=200, help="most lines per request (default: %(default)s)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls with -f (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the device (default: %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("watch", help="follow a running training job from another terminal",
                       description="Print a training run's rounds as they are recorded and the fleet's device "
                                   "states, from the coordinator home; ends when the run ends.")
    p.add_argument("run", nargs="?", default="latest", help="run id, prefix, suffix or `latest` (default: %(default)s)")
    _common(p, broker=False)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between looks (default: %(default)s)")
    p.add_argument("--wait", type=float, default=60.0,
                   help="with `latest`: seconds to wait for a run to appear (default: %(default)s)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("completion", help="print a shell completion script: eval \"$(edgeprune completion bash)\"")
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete for")
    p.set_defaults(func=cmd_completion)

    p = sub.add_parser("flash", help="install the agent on a device over SSH (or write an offline bundle)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="""\
Install (or upgrade) the edgeprune agent on a device over SSH and wait until it
is online in the fleet:

  edgeprune flash pi@raspberrypi.local --device-id pi-01 --broker mqtt://192.168.1.10:1883

It probes the device (architecture, OS, Python, disk, systemd, root, broker
reachability), builds an offline bundle of wheels for exactly that platform
(cached; --train adds TensorFlow + TF-MOT so the device can train), copies it with
scp, installs it into a venv with pip --no-index, writes the agent config (mode
0600) and starts a systemd unit (system unit as root, user unit with lingering
otherwise; a supervisor process where systemd is absent). Running it again
upgrades in place and keeps the device's identity, config and state.

For a device without network, write the bundle and install it by hand:

  edgeprune flash --bundle agent.tar.gz --arch aarch64 --python 3.11
  scp agent.tar.gz pi@raspberrypi.local: ; then on the device:
  tar xzf agent.tar.gz && sh edgeprune-agent-*/install.sh --device-id pi-01 --broker mqtt://LAPTOP:1883""")
    p.add_argument("target", nargs="?", help="[ssh://]USER@HOST[:PORT] (your ~/.ssh/config applies)")
    _common(p)
    p.add_argument("--device-id", help="the device's id in the fleet, [A-Za-z0-9_-]")
    p.add_argument("--data", help="training data on the device: a path there (.npz, .csv, image folder) or 'digits'")
    p.add_argument("--train", action="store_true", help="also install TensorFlow + TF-MOT so the device can train (~600 MB)")
    _ssh_arguments(p)
    p.add_argument("--remote-python", default="python3", help="the Python interpreter on the device (default python3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other agent setting for the device's config, repeatable (edgeprune-agent settings)")
    p.add_argument("--device-username", help="MQTT user name the device connects with (password authentication; "
                                             "with --device-password-file) [default: none]")
    p.add_argument("--device-password-file", help="file (mode 0600) with that user's password: copied to the device "
                                                  "0600, never put on a command line [default: none]")
    p.add_argument("--reinstall", action="store_true", help="make a fresh venv even if this bundle is installed")
    p.add_argument("--from-bundle", help="install this bundle file instead of building one")
    p.add_argument("--offline", action="store_true", help="build bundles from the local wheel cache only; never download")
    p.add_argument("--local-broker", help="broker URL as this laptop sees it, if different from --broker")
    p.add_argument("--online-timeout", type=float, default=120.0, help="seconds to wait for the device online (default 120)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    g = p.add_argument_group("offline bundle only (no TARGET)")
    g.add_argument("--bundle", metavar="OUT.tar.gz", help="only write the offline bundle to this file")
    g.add_argument("--arch", default="aarch64", help="device architecture as `uname -m` prints it (default aarch64)")
    g.add_argument("--python", dest="python_version", default="3.11",
                   help="device Python major.minor (default 3.11 = Raspberry Pi OS Bookworm)")
    g.add_argument("--glibc", default="2.36", help="device glibc version (default 2.36 = Bookworm)")
    p.set_defaults(func=cmd_flash)

    p = sub.add_parser("unflash", help="stop and remove the agent from a device over SSH",
                       description="Stop the agent's service and remove it, its venvs, its config and (unless "
                                   "--keep-state) its state from the device. With --device-id it also clears the "
                                   "device's retained presence on the broker and drops it from the registry.")
    p.add_argument("target", help="[ssh://]USER@HOST[:PORT]")
    _common(p)
    p.add_argument("--device-id", help="also forget this device in the fleet")
    p.add_argument("--keep-state", action="store_true", help="keep the agent's state directory (blob cache)")
    _ssh_arguments(p)
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_unflash)

    p = sub.add_parser("simulate", help="run N simulated agents (real agent code, synthetic trainer) for scale tests",
                       description="Start N lightweight agents packed into a few processes: each is the real agent "
                                   "(its own MQTT connection, presence, commands, blob transfer, outbox), with a "
                                   "synthetic trainer that answers a round after --delay seconds with a correctly "
                                   "shaped sparse update of the model it was sent; no TensorFlow. Runs until Ctrl-C "
                                   "(or --duration). Then `edgeprune train --fleet FLEET --eval-data none "
                                   "--input-shape 8 8 1 --num-classes 10` trains over them.")
    _common(p, broker=True)
    p.set_defaults(fleet=os.environ.get("EDGEPRUNE_FLEET", "sim"))
    p.add_argument("--devices", type=int, required=True, help="number of simulated devices")
    p.add_argument("--processes", type=int, default=None, help="processes to pack them into (default: CPU count)")
    p.add_argument("--delay", type=float, default=1.0, help="seconds a synthetic training round takes (default 1)")
    p.add_argument("--samples", type=int, default=100, help="samples each device claims (its FedAvg weight; default 100)")
    p.add_argument("--prefix", default="sim", help="device ids are PREFIX-00000, PREFIX-00001, ... (default sim)")
    p.add_argument("--heartbeat-s", type=float, default=None, help="heartbeat interval (default: the agent's, 10 s)")
    p.add_argument("--keepalive-s", type=int, default=None,
                   help="MQTT keepalive (default 60: hundreds of agents share a process, and a busy one must not "
                        "be taken for a dead device)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--state-dir", default=None, help="keep the agents' state here (default: a temporary directory, removed)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("train", help="federated pruning-aware training over the live fleet",
                       description="Train one model across the fleet's devices. Each device trains on its own data "
                                   "with TF-MOT pruning at the round's scheduled sparsity and uploads a sparse update; "
                                   "the coordinator aggregates them (masked FedAvg) into a pruned global model, "
                                   "evaluates it on held-out data and stores every round.")
    _common(p)
    from edge_agent.models import BUILTIN
    from edge_agent.pruning import BLOCK_SHAPE, GRANULARITIES

    from .aggregate import AGGREGATIONS
    from .masks import MASK_POLICIES
    from .rounds import UPDATE_FORMATS, TrainConfig
    from .schedule import SCHEDULES

    d = TrainConfig()  # the defaults live there; --help reads them
    block = f"{BLOCK_SHAPE[1]}x{BLOCK_SHAPE[0]}"
    p.add_argument("--model", default=d.model, help=f"built-in model ({', '.join(BUILTIN)}) or a tf-keras model file "
                                                    f"(.keras, .h5, SavedModel dir) (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=d.sparsity,
                   help="target fraction of pruned weights; 0 = dense FedAvg (default: %(default)s)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="sparsity over rounds: polynomial ramp to the target, then hold; or constant from round 1 "
                        "(default: %(default)s)")
    p.add_argument("--ramp-fraction", type=float, default=d.ramp_fraction,
                   help="polynomial: fraction of rounds to reach the target (default: %(default)s)")
    p.add_argument("--regrow", type=float, default=d.regrow,
                   help="each round, clients train every weight (pruned ones from zero) for this fraction of their "
                        "local steps, then prune by magnitude, so weights that matter can grow back; 0 = fixed masks "
                        "that only shrink (2:4 never regrows) (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--clients-per-round", type=int, help="devices sampled per round (default: all eligible)")
    g.add_argument("--fraction", type=float, help="fraction of eligible devices sampled per round (default: all)")
    p.add_argument("--min-clients", type=int, default=d.min_clients,
                   help="updates needed to apply a round; a run where no round applied fails (default: %(default)s)")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help="local epochs per round (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="local batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="local learning rate (default: %(default)s)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default=d.optimizer, help="local optimizer (default: %(default)s)")
    p.add_argument("--granularity", choices=GRANULARITIES, default=d.granularity,
                   help=f"pruning granularity: single weights, {block} blocks (Dense kernels; what TFLite's sparse "
                        f"int8 stores compactly), or 2:4 (50%%) (default: %(default)s)")
    p.add_argument("--mask-policy", choices=MASK_POLICIES, default=d.mask_policy,
                   help="global mask each round: one magnitude threshold across all layers at the scheduled sparsity "
                        "(global), the same sparsity in every layer, or the union/intersection of client masks "
                        "(default: %(default)s)")
    p.add_argument("--update-format", choices=UPDATE_FORMATS, default=d.update_format,
                   help="upload value encoding; auto = int4 deltas with stochastic rounding when pruning, "
                        "plain fp32 for dense FedAvg (default: %(default)s)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=d.aggregation,
                   help="how updates combine: sample-weighted FedAvg (streaming), or coordinate-wise "
                        "median / trimmed mean among the clients that kept each weight (robust to a few bad "
                        "clients; keeps all updates of a round in memory) (default: %(default)s)")
    p.add_argument("--trim", type=float, default=d.trim, help="trimmed-mean: fraction cut at each end (default: %(default)s)")
    p.add_argument("--clip-norm", type=float, default=d.clip_norm,
                   help="clip each update (client minus global) to this L2 norm; 0 = off (default: %(default)s)")
    p.add_argument("--max-norm-ratio", type=float, default=d.max_norm_ratio,
                   help="reject an update whose norm exceeds this multiple of the model's norm; 0 = off "
                        "(default: %(default)s)")
    p.add_argument("--structured", type=float, default=d.structured, metavar="FRACTION",
                   help="structured pruning: remove this fraction of the units/filters of every Dense and Conv2D "
                        "layer that can shrink safely (ranked by the fleet's importance statistics), gradually, "
                        "with recovery training between steps; weight pruning then sparsifies what remains; 0 = off "
                        "(default: %(default)s)")
    p.add_argument("--structured-every", type=int, default=d.structured_every, metavar="K",
                   help="one structured step every K rounds, the last at least one round before the end "
                        "(default: %(default)s)")
    p.add_argument("--importance", choices=IMPORTANCE_METHODS, default=d.importance,
                   help="how devices rank units: mean |activation| on local data, weight L1/L2 norm, or "
                        "a first-order Taylor score (default: %(default)s)")
    p.add_argument("--round-timeout", type=float, default=d.round_timeout_s,
                   help="seconds to wait for updates in a round (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed for model init, client sampling and local shuffling (default: %(default)s)")
    p.add_argument("--eval-data", default=d.eval_data, help="held-out data on the coordinator: 'digits', .npz, .csv, "
                                                           "image folder, or 'none' (default: %(default)s)")
    p.add_argument("--input-shape", type=int, nargs="+", help="input shape for a built-in model without --eval-data")
    p.add_argument("--num-classes", type=int, help="classes for a built-in model without --eval-data")
    p.add_argument("--devices", help="comma-separated device ids to use (default: every device that can train)")
    p.add_argument("--wait-for", type=int, default=d.wait_for_devices,
                   help="before round 1, wait (once) until this many devices can train; on timeout go on only if "
                        "--min-clients allows (default: %(default)s = do not wait)")
    p.add_argument("--wait-timeout", type=float, default=d.wait_timeout_s,
                   help="seconds --wait-for waits (default: %(default)s)")
    p.add_argument("--resume", metavar="RUN",
                   help="continue an interrupted run (coordinator killed, machine rebooted) after its last recorded "
                        "round, on the run's own fleet, broker and settings: no completed round is repeated or lost")
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                   help=f"bytes per MQTT message when sending models (default {DEFAULT_CHUNK_BYTES}; keep under "
                        "the broker's limit: EMQX 1 MB, AWS IoT 128 KB)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="turn a run's global model (or a tf-keras file) into TFLite artifacts",
                       description="Convert a trained model into TFLite variants and record each with its sha256, "
                                   "raw and gzip size, and the weight sparsity read back from the .tflite bytes. "
                                   "Note: TFLite stores int8 sparsity compactly only in 1x16 blocks of FULLY_CONNECTED "
                                   "weights; train with --granularity block for small sparse-int8 artifacts.")
    p.add_argument("model", help="run id (prefix), a tf-keras model file (.keras, .h5, SavedModel dir), or a built-in "
                                 "model name (digits_cnn, mlp, mobilenet_tiny) for a latency study with untrained weights")
    p.add_argument("--prune", type=float, default=0.0, help="built-in model only: magnitude-prune to this sparsity with TF-MOT")
    p.add_argument("--prune-policy", choices=["all", "xnnpack"], default="all",
                   help="built-in model only: which layers --prune touches (xnnpack: 1x1 convolutions only)")
    p.add_argument("--granularity", choices=["unstructured", "block", "2:4"], default="unstructured",
                   help="built-in model only: pruning granularity for --prune")
    p.add_argument("--formats", default="dense,sparse,sparse-int8,fp16", help="comma-separated: dense, sparse, sparse-int8, fp16")
    p.add_argument("--qat", action="store_true", help="also make sparse-int8-qat: pruning-preserving quantisation-aware fine-tuning")
    p.add_argument("--qat-data", default="digits", help="training data for --qat fine-tuning: 'digits', .npz or .csv (default digits)")
    p.add_argument("--calibration-data", help="representative data for int8 calibration (default: the run's eval data)")
    p.add_argument("--out", help="output directory (default: the run's artifacts/ folder)")
    _common(p, broker=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="benchmark a run's artifacts (or .tflite files) on devices",
                       description="Send TFLite artifacts to devices (chunked, sha256-verified, cached by hash), "
                                   "benchmark them interleaved on each device, and store the results.")
    _common(p)
    p.add_argument("--model", required=True, help="run id (exported first if needed), a .tflite file, a folder of them, or a model file")
    p.add_argument("--formats", default="dense,sparse,sparse-int8,fp16", help="variants to export when the run has none yet")
    p.add_argument("--devices", default="all", help="'all' or comma-separated device ids")
    p.add_argument("--threads", type=int, default=0, help="interpreter threads (0 = runtime default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--runs", type=int, default=None, help="timed inferences per artifact (default 200)")
    g.add_argument("--duration", type=float, default=None, help="seconds of timed inferences per artifact instead")
    p.add_argument("--warmup", type=int, default=10, help="untimed inferences first (default 10)")
    p.add_argument("--budget", type=float, default=600.0, help="seconds an artifact may take before it is stopped (default 600)")
    p.add_argument("--runtime", default="auto", choices=["auto", "litert", "tflite_runtime", "tf.lite"],
                   help="force a runtime (default: the best the device has)")
    p.add_argument("--parallel", action="store_true", help="benchmark all devices at once (default: one after another)")
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                   help=f"bytes per MQTT message when sending artifacts (default {DEFAULT_CHUNK_BYTES})")
    p.add_argument("--wait", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="print a run's summary and write a self-contained HTML report",
                       description="Accuracy and sparsity per round, bytes per round, artifact sizes, latency per "
                                   "variant per device (p50 with p90/p99), energy per inference with its label, "
                                   "temperatures.")
    p.add_argument("run", help="training run id (prefix) or a bench id")
    p.add_argument("--html", help="write the HTML report to this file")
    _common(p, broker=False)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("runs", help="list training runs (and other jobs) in the coordinator home; runs rm RUN",
                       description="List runs (newest first). A run can be named by its id, a unique prefix or "
                                   "suffix of it, or `latest`, wherever a command takes RUN.")
    _common(p, broker=False)
    p.set_defaults(func=cmd_runs)
    rs = p.add_subparsers(dest="runs_cmd", metavar="{rm}")
    q = rs.add_parser("rm", help="delete a run: its records, rounds, artifacts, benchmark results and run directory")
    q.add_argument("run", help="run id, unique prefix or suffix, or `latest`")
    q.add_argument("--force", action="store_true", help="also a run still marked running")
    _common(q, broker=False)
    q.set_defaults(func=cmd_runs_rm)

    p = sub.add_parser("show", help="print one run: config, per-round accuracy, sparsity, bytes, failures")
    _common(p, broker=False)
    p.add_argument("run", help="run id (a unique prefix is enough)")
    p.set_defaults(func=cmd_show)
    return parser


def _explicit(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> set[str]:
    """The options the user typed (not defaults): --resume refuses those that contradict the run."""
    subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    sp = subs.choices.get(getattr(args, "command", None)) if subs else None
    if sp is None:
        return set()
    out = set()
    for token in argv:
        if token.startswith("--"):
            action = sp._option_string_actions.get(token.split("=", 1)[0])
            if action is not None:
                out.add(action.dest)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _CONFIG.clear()
        _CONFIG.update(config_file()[1])
        parser = build_parser()
        args = parser.parse_args(argv)
    except UsageError as exc:
        return output.fail(str(exc), code="usage", as_json="--json" in argv, status=2)
    args.explicit = _explicit(parser, args, argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        rc = output.fail("interrupted", code="interrupted", as_json=getattr(args, "json", False), status=130)
    except UsageError as exc:
        rc = output.fail(str(exc), code="usage", as_json=getattr(args, "json", False), status=2)
    except Exception as exc:  # a bug: keep the traceback for the report, and the one error shape for scripts
        import traceback

        traceback.print_exc()
        rc = output.fail(f"internal error: {type(exc).__name__}: {exc} (traceback above; please report it)",
                         code="internal", as_json=getattr(args, "json", False))
    if "tensorflow" in sys.modules:
        # TensorFlow's interpreter teardown takes seconds and does nothing for us: every file,
        # the SQLite store and the MQTT session are closed by now. Skip it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
