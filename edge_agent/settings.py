"""Agent settings: one table of (name, default, help), read from TOML, environment, CLI.

Precedence, lowest to highest: defaults, the TOML file (``--config`` or
``EDGEPRUNE_CONFIG``, else ``/etc/edgeprune/agent.toml`` or
``~/.config/edgeprune/agent.toml`` if present), ``EDGEPRUNE_<NAME>``
environment variables, command-line flags. Everything is validated at start-up
and a bad value stops the agent with one clear message.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol.errors import EdgepruneError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .ml.data import BUILTIN_DATASETS, FASHION_MNIST_PACKAGE
from .ml.shards import PARTITION_FORMS, parse_partition
from .protocol.constants import DEFAULT_CHUNK_BYTES, DEFAULT_HEARTBEAT_S, DEFAULT_KEEPALIVE_S, MAX_CONTROL_BYTES
from .protocol.topics import ID_RE

ENV_PREFIX = "EDGEPRUNE_"


def _default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64].strip("-")
    return name or "device"


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    type: type
    help: str
    choices: tuple | None = None
    flag_ok: bool = True  # False for secrets: a command line is visible to every user of the machine (ps)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "broker",
        "mqtt://127.0.0.1:1883",
        str,
        "MQTT broker URL, mqtt://HOST:PORT (or mqtts:// for TLS); several, "
        "comma-separated (a TOML list also works), are tried in order for failover",
    ),
    Setting(
        "username",
        "",
        str,
        "MQTT user name sent in CONNECT (brokers with password authentication: EMQX, HiveMQ, "
        "RabbitMQ, ejabberd, Mosquitto password_file)",
    ),
    Setting(
        "password",
        "",
        str,
        "MQTT password; only from the TOML file or the environment, never a flag " "(prefer password_file)",
        flag_ok=False,
    ),
    Setting(
        "password_file", "", str, "file holding the MQTT password (first line; must not be readable by group or others)"
    ),
    Setting(
        "plain_password",
        False,
        bool,
        "allow sending the password over plain TCP (mqtt://) to a non-loopback "
        "broker; without it the agent refuses: use mqtts://",
    ),
    Setting("fleet", "default", str, "fleet name: one topic level, [A-Za-z0-9_-]"),
    Setting("tls_ca", "", str, "mqtts:// only: the fleet CA certificate (PEM) the broker's certificate must chain to"),
    Setting("tls_cert", "", str, "mqtts:// only: this device's client certificate (PEM; its CN is the device id)"),
    Setting("tls_key", "", str, "mqtts:// only: this device's private key (PEM, keep it 0600)"),
    Setting("sign_key", "", str, "this device's Ed25519 private key (PEM): every reply is signed with it"),
    Setting(
        "coordinator_key",
        "",
        str,
        "the coordinator's Ed25519 public key (PEM): when set, only signed, fresh, " "never-seen commands are run",
    ),
    Setting(
        "max_command_age_s",
        300.0,
        float,
        "with coordinator_key: commands older (or newer) than this are refused as replays",
    ),
    Setting("device_id", None, str, "this device's id, [A-Za-z0-9_-] (default: the host name)"),
    Setting(
        "state_dir",
        None,
        str,
        "where the agent keeps its blob cache and outbox (default: ~/.local/state/edgeprune/agent-<device_id>)",
    ),
    Setting("heartbeat_s", DEFAULT_HEARTBEAT_S, float, "seconds between heartbeats (retained status re-published)"),
    Setting(
        "keepalive_s", DEFAULT_KEEPALIVE_S, int, "MQTT keepalive; the broker publishes the Will after about 1.5x this"
    ),
    Setting("reconnect_min_s", 0.5, float, "first reconnect delay; doubles with jitter up to reconnect_max_s"),
    Setting("reconnect_max_s", 30.0, float, "longest reconnect delay"),
    Setting(
        "max_message_bytes",
        MAX_CONTROL_BYTES,
        int,
        "largest control message accepted; larger ones get a too_large error reply",
    ),
    Setting(
        "chunk_bytes",
        DEFAULT_CHUNK_BYTES,
        int,
        "payload bytes per chunk when uploading blobs (keep under the broker's message limit)",
    ),
    Setting(
        "blob_cache_bytes",
        512 << 20,
        int,
        "disk space for cached models/artifacts before least-recently-used ones are evicted",
    ),
    Setting(
        "model_cache",
        2,
        int,
        "global models kept (by digest) so the next round can come down as a delta against one; 0 = none",
    ),
    Setting(
        "model_cache_bytes",
        1 << 30,
        int,
        "disk space for those models; the newest are kept",
    ),
    Setting(
        "data",
        "",
        str,
        f"local training data: built in ({' or '.join(repr(d) for d in BUILTIN_DATASETS)}; "
        f"fashion-mnist needs the Debian package {FASHION_MNIST_PACKAGE}), a .npz (x, y), "
        "a .csv (label column) or an image folder",
    ),
    Setting(
        "data_shard",
        "0/1",
        str,
        "for built-in data: which shard of the training split this device holds, as INDEX/COUNT",
    ),
    Setting(
        "data_partition",
        "iid",
        str,
        f"for built-in data: how shards are drawn: {PARTITION_FORMS} (C classes "
        "per device); shards are disjoint and cover the training split",
    ),
    Setting(
        "data_alpha",
        0.5,
        float,
        "Dirichlet concentration for data_partition = dirichlet (smaller = more skewed); "
        "dirichlet:ALPHA overrides it",
    ),
    Setting("data_seed", 0, int, "seed for the built-in data partition (the same on every device of a fleet)"),
    Setting("data_label_column", "label", str, "label column for CSV data"),
    Setting("train_threads", 0, int, "TensorFlow intra-op threads in the training worker (0 = TensorFlow's default)"),
    Setting("worker_idle_s", 600.0, float, "the training worker (TensorFlow) exits after this many idle seconds"),
    Setting(
        "board",
        "",
        str,
        "board name for the energy model when /proc/device-tree/model is missing (e.g. 'Raspberry Pi 4 Model B')",
    ),
    Setting(
        "sysfs_root", "/sys", str, "where to read thermal, cpufreq and power sensors (tests point it at a fake tree)"
    ),
    Setting("bench_budget_s", 600.0, float, "longest a benchmark may run per artifact before it is stopped"),
    Setting("log_level", "info", str, "logging level", ("debug", "info", "warning", "error")),
)
BY_NAME = {s.name: s for s in SETTINGS}


class SettingsError(EdgepruneError, ValueError):
    """A setting has a bad value; the message names it and where it came from."""

    code = "settings"


def _typed_ok(setting: Setting, value: Any) -> bool:
    """A TOML value already has a type: it must be the setting's (an int for a float is fine)."""
    if setting.name == "broker" and isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    if setting.type is bool:
        return isinstance(value, bool)
    if setting.type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if setting.type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, setting.type)


def convert(setting: Setting, value: Any, source: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) and not _typed_ok(setting, value):
        expected = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[setting.type]
        raise SettingsError(
            f"setting {setting.name} from {source}: {value!r} is {type(value).__name__}, "
            f"expected {expected}" + (' (quote it: "..." )' if setting.type is str else "")
        )
    try:
        if setting.type is bool and isinstance(value, str):
            converted = value.strip().lower() in ("1", "true", "yes", "on")
        elif setting.name == "broker" and isinstance(value, list):  # TOML: broker = ["mqtt://a", "mqtt://b"]
            converted = ",".join(str(v) for v in value)
        elif setting.type is int and isinstance(value, str):
            converted = int(value, 0)
        else:
            converted = setting.type(value)
    except (TypeError, ValueError):
        raise SettingsError(
            f"setting {setting.name} from {source}: {value!r} is not a valid {setting.type.__name__}"
        ) from None
    if setting.choices and converted not in setting.choices:
        raise SettingsError(
            f"setting {setting.name} from {source}: {converted!r} is not one of {', '.join(setting.choices)}"
        )
    return converted


def default_config_paths() -> list[Path]:
    return [Path("/etc/edgeprune/agent.toml"), Path.home() / ".config" / "edgeprune" / "agent.toml"]


def load(
    cli: dict[str, Any] | None = None, config_path: str | None = None, environ: dict[str, str] | None = None
) -> dict[str, Any]:
    """Resolve every setting from defaults, TOML, environment and CLI; validate."""
    environ = dict(os.environ if environ is None else environ)
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}

    path = config_path or environ.get(ENV_PREFIX + "CONFIG")
    if path is None:
        path = next((str(p) for p in default_config_paths() if p.is_file()), None)
    if path is not None:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path}: {exc}") from None
        table = table.get("agent", table)
        for key, value in table.items():
            if key not in BY_NAME:
                raise SettingsError(f"config file {path}: unknown setting {key!r}")
            values[key] = convert(BY_NAME[key], value, path)
    for s in SETTINGS:
        if s.env in environ:
            values[s.name] = convert(s, environ[s.env], s.env)
    for key, value in cli.items():
        values[key] = convert(BY_NAME[key], value, BY_NAME[key].flag)

    values["config_path"] = path
    return validate(values)


def validate(values: dict[str, Any]) -> dict[str, Any]:
    if values["device_id"] is None:
        values["device_id"] = _default_device_id()
    for key in ("fleet", "device_id"):
        if not ID_RE.match(values[key]):
            raise SettingsError(f"setting {key}: {values[key]!r} must be 1-64 characters from [A-Za-z0-9_-]")
    if values["state_dir"] is None:
        values["state_dir"] = str(Path.home() / ".local" / "state" / "edgeprune" / f"agent-{values['device_id']}")
    for key in ("heartbeat_s", "keepalive_s", "reconnect_min_s", "max_message_bytes", "chunk_bytes", "worker_idle_s"):
        if values[key] <= 0:
            raise SettingsError(f"setting {key}: must be positive, got {values[key]}")
    for key in ("model_cache", "model_cache_bytes"):
        if values[key] < 0:
            raise SettingsError(f"setting {key}: must be >= 0, got {values[key]}")
    if values["reconnect_max_s"] < values["reconnect_min_s"]:
        raise SettingsError("setting reconnect_max_s: must be >= reconnect_min_s")
    if not re.match(r"^\d+/\d+$", values["data_shard"]):
        raise SettingsError(f"setting data_shard: {values['data_shard']!r} must look like INDEX/COUNT, e.g. 2/8")
    index, count = map(int, values["data_shard"].split("/"))
    if count < 1 or not 0 <= index < count:
        raise SettingsError(f"setting data_shard: index {index} must be in 0..{count - 1}")
    try:
        parse_partition(values["data_partition"], values["data_alpha"])
    except ValueError as exc:  # a bare 'dirichlet' takes its concentration from data_alpha
        name = "data_alpha" if values["data_partition"].strip().lower() == "dirichlet" else "data_partition"
        raise SettingsError(f"setting {name}: {exc}") from None
    from .common.link import check_credentials, parse_broker_urls

    try:
        addresses = parse_broker_urls(values["broker"])
    except ValueError as exc:
        raise SettingsError(f"setting broker: {exc}") from None
    address = addresses[0]
    if values["password_file"]:
        values["password"] = read_secret(values["password_file"], "password_file")
    if values["password"] and not values["username"]:
        raise SettingsError("setting password: needs a username")
    try:
        check_credentials(addresses, values["password"], values["plain_password"])
    except ValueError as exc:
        raise SettingsError(f"setting password: {exc}") from None
    for key in ("tls_ca", "tls_cert", "tls_key", "sign_key", "coordinator_key"):
        if values[key] and not os.path.isfile(values[key]):
            raise SettingsError(f"setting {key}: no such file {values[key]!r}")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise SettingsError("settings tls_cert and tls_key go together")
    if values["tls_cert"] and not address.tls:
        raise SettingsError("tls_cert is set but the broker URL is not mqtts://: the certificate would not be used")
    return values


def read_secret(path: str, what: str) -> str:
    """The first line of a file only its owner can read (a secret readable by others is refused)."""
    try:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            raise SettingsError(
                f"setting {what}: {path} is readable by group or others (mode {mode & 0o777:o}); " f"chmod 600 {path}"
            )
        with open(path, encoding="utf-8") as f:
            secret = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"setting {what}: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise SettingsError(f"setting {what}: {path} is empty")
    return secret


def redacted(values: dict[str, Any]) -> dict[str, Any]:
    """Settings safe to print or log."""
    return {k: ("***" if k == "password" and v else v) for k, v in values.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (secrets excepted), with its help and environment variable."""
    for s in SETTINGS:
        if not s.flag_ok:
            continue
        kwargs: dict[str, Any] = {
            "dest": s.name,
            "default": None,
            "help": f"{s.help} [env {s.env}; default {s.default!r}]",
        }
        if s.choices:
            kwargs["choices"] = s.choices
        parser.add_argument(s.flag, **kwargs)


def markdown_table() -> str:
    rows = ["| setting | environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.name}` | `{s.env}` | `{s.default!r}` | {s.help} |")
    return "\n".join(rows)
