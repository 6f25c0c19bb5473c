"""What every command shares: options, the config file, sessions, usage errors, --help defaults."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edge_agent.protocol.constants import DEFAULT_CHUNK_BYTES
from edge_agent.protocol.errors import EdgepruneError

from .. import output
from ..store import Store, default_home

DESCRIPTION = """\
edgeprune: pruning-aware federated learning and on-device benchmarking for
fleets of Raspberry-Pi-class devices, over MQTT.

  edgeprune broker              run an MQTT broker for the fleet (Mosquitto, or embedded)
  edgeprune flash USER@HOST     install the agent on a device over SSH (--bundle: offline bundle)
  edgeprune unflash USER@HOST   remove it again
  edgeprune devices             list the fleet's devices, their state and capabilities (devices forget ID)
  edgeprune ping --device ID    round-trip a command to one device
  edgeprune logs DEVICE [-f]    the agent's recent log lines, over MQTT
  edgeprune train               federated pruning-aware training over the fleet
  edgeprune watch [RUN]         follow a running training job from another terminal
  edgeprune runs                list runs (runs rm RUN);  edgeprune show RUN  prints one
  edgeprune export RUN          TFLite artifacts: dense, sparse, sparse-int8, fp16 (+ --qat)
  edgeprune bench --model RUN   benchmark the artifacts on the devices
  edgeprune report RUN          terminal summary and a self-contained HTML report
  edgeprune simulate --devices N   N simulated agents (real agent code, synthetic trainer) for scale tests
  edgeprune completion bash     shell completion: eval "$(edgeprune completion bash)"

RUN is a run id, a unique prefix or suffix of one, or `latest`. Common settings
come from flags, EDGEPRUNE_BROKER / EDGEPRUNE_FLEET / EDGEPRUNE_HOME /
EDGEPRUNE_USERNAME, or an edgeprune.toml (broker, fleet, home, username,
password_file) in the working directory or the home. Every command takes --json.
"""


def _common(p: argparse.ArgumentParser, broker: bool = True) -> None:
    if broker:
        p.add_argument(
            "--broker",
            type=_broker_urls,
            default=_default("broker", "EDGEPRUNE_BROKER", "mqtt://127.0.0.1:1883"),
            help="MQTT broker URL; several, comma-separated, are tried in order (failover) "
            "[env EDGEPRUNE_BROKER or edgeprune.toml; default %(default)s]",
        )
        p.add_argument(
            "--username",
            default=_default("username", "EDGEPRUNE_USERNAME", None),
            help="MQTT user name [env EDGEPRUNE_USERNAME; default none]; the password comes from "
            "EDGEPRUNE_PASSWORD or --password-file, never from a flag",
        )
        p.add_argument(
            "--password-file",
            default=_default("password_file", "EDGEPRUNE_PASSWORD_FILE", None),
            help="file whose first line is the MQTT password, mode 0600 [env EDGEPRUNE_PASSWORD_FILE; " "default none]",
        )
        p.add_argument(
            "--plain-password",
            action="store_true",
            help="allow the password over plain TCP (mqtt://) to a non-loopback broker [default: refused]",
        )
        p.add_argument(
            "--fleet",
            type=_fleet_id,
            default=_default("fleet", "EDGEPRUNE_FLEET", "default"),
            help="fleet name [env EDGEPRUNE_FLEET or edgeprune.toml; default %(default)s]",
        )
    p.add_argument(
        "--home",
        default=_default("home", "EDGEPRUNE_HOME", None),
        help="coordinator home: database, runs, artifacts [env EDGEPRUNE_HOME or edgeprune.toml; "
        "default ~/.local/share/edgeprune]",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")


CONFIG_KEYS = ("broker", "fleet", "home", "username", "password_file")


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


class UsageError(EdgepruneError, ValueError):
    """A bad flag or setting value: exit 2 with one line, not a traceback."""

    code = "usage"


class _DefaultsMixin:
    """Every option with a default says it in --help, taken from the parser (so it cannot drift)."""

    def _get_help_string(self, action):  # type: ignore[no-untyped-def]
        text = action.help or ""
        if (
            "%(default)" not in text
            and "default" not in text
            and action.default not in (None, False, [])
            and action.default is not argparse.SUPPRESS
            and action.option_strings
        ):
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
    from edge_agent.common.link import parse_broker_urls

    try:
        memory = parse_broker_urls(value)[0].memory
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if memory:  # devices run in other processes: they could never reach it
        raise argparse.ArgumentTypeError(f"{value}: memory:// is an in-process broker for tests; use mqtt://")
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
    return {
        "username": username,
        "password": password,
        "force_plain_password": bool(getattr(args, "plain_password", False)),
    }


def _connection(args: argparse.Namespace, broker_url: str) -> dict:
    """Session keyword arguments for how this coordinator authenticates: a password, and on a TLS broker
    the home's certificate and signing keys (raises ValueError with the fix)."""
    from .. import pki

    return {**_credentials(args), **pki.session_security(_store(args).home, broker_url)}


def _session(args: argparse.Namespace, long_running: bool = False):
    from ..session import Session

    try:
        session = Session(
            args.broker,
            args.fleet,
            _store(args),
            long_running=long_running,
            chunk_bytes=getattr(args, "chunk_bytes", DEFAULT_CHUNK_BYTES),
            **_connection(args, args.broker),
        )
    except ValueError as exc:  # broker URLs, credentials: the user's to fix
        raise UsageError(str(exc)) from None
    return session.start(args.connect_timeout)


def _find_run(args: argparse.Namespace, ref: str):
    from ..store import RunNotFound

    try:
        return _store(args).resolve_run(ref), None
    except RunNotFound as exc:
        return None, output.fail(str(exc), code="not_found", as_json=args.json)


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


def positive(text: str) -> float:
    """argparse type: a number > 0 (a budget, a duration)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number")
    return value
