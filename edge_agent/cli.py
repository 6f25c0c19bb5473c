"""``edgeprune-agent``: run the device agent, or print what it would announce."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from . import __version__
from . import settings as settings_mod

DESCRIPTION = """\
The edgeprune device agent. It connects to the fleet's MQTT broker, announces
the device and its capabilities, heartbeats, and runs the coordinator's
commands: federated training rounds (in a TensorFlow worker process started
only while a training run is active) and on-device model benchmarks.

Every setting can come from a TOML file (--config), an EDGEPRUNE_* environment
variable or a flag; flags win. `edgeprune-agent settings` lists them all.
"""


def _cmd_run(args: argparse.Namespace) -> int:
    cli = {s.name: getattr(args, s.name, None) for s in settings_mod.SETTINGS}
    try:
        values = settings_mod.load(cli, args.config)
    except settings_mod.SettingsError as exc:
        print(f"edgeprune-agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=values["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import commands  # noqa: F401  (registers training and benchmark commands; imports nothing heavy)
    from .daemon import Agent

    try:
        agent = Agent(values)
    except (ImportError, ValueError, OSError) as exc:  # keys, state dir: a restart will not fix it
        print(f"edgeprune-agent: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    def _graceful(signum, frame):
        agent.stop()

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    agent.start()
    agent.wait()
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import caps

    try:
        values = settings_mod.load({"device_id": args.device_id}, args.config)
    except settings_mod.SettingsError as exc:
        print(f"edgeprune-agent: {exc}", file=sys.stderr)
        return 2
    info = caps.as_dict(caps.collect(values["device_id"], values["state_dir"]))
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_settings(args: argparse.Namespace) -> int:
    if args.json:
        print(
            json.dumps(
                [{"name": s.name, "env": s.env, "default": s.default, "help": s.help} for s in settings_mod.SETTINGS],
                indent=2,
            )
        )
    else:
        print(settings_mod.markdown_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeprune-agent", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"edgeprune-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="connect to the broker and serve the coordinator",
        description="Run the agent until SIGTERM/SIGINT; it publishes 'offline' on the way out.",
    )
    run.add_argument("--config", help="TOML file with agent settings [env EDGEPRUNE_CONFIG]")
    settings_mod.add_arguments(run)
    run.set_defaults(func=_cmd_run)

    info = sub.add_parser("info", help="print this device's capabilities (what the agent announces)")
    info.add_argument("--config", help="TOML file with agent settings")
    info.add_argument("--device-id", dest="device_id", help="device id to report (default from settings)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)

    st = sub.add_parser("settings", help="list every setting with its environment variable, default and meaning")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_cmd_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
