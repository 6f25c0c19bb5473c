"""Honest outcomes at the command line: what a user who mistypes gets back.

Usage errors exit 2 with one line (JSON: the one error shape), tables keep ids whole,
help states every default, device text is never read as markup, run ids resolve by
prefix, suffix or `latest`, and a train that cannot train says so and exits non-zero,
never `done`. The fleet checks run against a real Mosquitto and real agent processes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pytest

from coordinator import cli, output
from coordinator.progress import Reporter
from coordinator.store import RunNotFound, Store

from .conftest import wait_until


def _subcommands(parser):
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in subs.choices.items():
        nested = next((a for a in sp._actions if isinstance(a, argparse._SubParsersAction)), None)
        yield [name], sp
        if nested:
            for sub_name, ssp in nested.choices.items():
                yield [name, sub_name], ssp


def test_every_subcommand_answers_a_bad_argument_with_the_json_error_shape(capsys):
    commands = list(_subcommands(cli.build_parser()))
    assert len(commands) >= 18
    for words, _ in commands:
        rc = cli.main([*words, "--json", "--no-such-flag"])
        out = capsys.readouterr().out
        assert rc == 2, words
        err = json.loads(out)["error"]
        assert err["code"] == "usage" and "\n" not in err["message"], (words, out)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["devices", "--broker", "http://x"], "unsupported broker URL scheme"),
        (["devices", "--broker", "mqtt://h:99999"], "invalid port"),
        (["devices", "--broker", "mqtt//host"], "path or query"),
        (["devices", "--fleet", "de mo"], "invalid fleet"),
        (["ping", "--device", "pi/1"], "invalid device id"),
        (["train", "--model", "./nope/model.keras", "--broker", "mqtt://127.0.0.1:9"], "no such file"),
        (["train", "--model", "resnet9000", "--broker", "mqtt://127.0.0.1:9"], "unknown built-in model"),
        (["train", "--schedule", "linear"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv, needle, capsys):
    assert cli.main([*argv, "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert needle in err["message"] and err["code"] in ("usage", "bad_args"), err
    assert cli.main(argv) == 2
    text = capsys.readouterr().err
    assert needle in text and "Traceback" not in text and "internal error" not in text


def test_a_closed_port_is_reported_at_once(capsys):
    t0 = time.monotonic()
    assert cli.main(["devices", "--broker", "mqtt://127.0.0.1:9", "--json"]) == 1
    assert time.monotonic() - t0 < 4
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["code"] == "connect" and "connection refused" in err["message"]


def test_broker_on_a_busy_port_says_so_before_anything_else(mosquitto, capsys):
    assert cli.main(["broker", "--embedded", "--port", str(mosquitto.port), "--json"]) == 2
    out = capsys.readouterr().out
    assert json.loads(out)["error"]["code"] == "port_in_use" and out.count("{") == 2  # one object, no success line


def test_every_flag_with_a_default_states_it():
    missing = []
    for words, sp in _subcommands(cli.build_parser()):
        formatter = sp._get_formatter()
        for action in sp._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action)
            if "default" not in text:
                missing.append(f"{' '.join(words)} {action.option_strings[0]}")
    assert not missing, missing


def test_help_comes_from_the_concepts_constants():
    from edge_agent.ml.models import BUILTIN
    from edge_agent.ml.pruning import BLOCK_SHAPE

    text = subprocess.run(
        [sys.executable, "-m", "coordinator", "train", "--help"], capture_output=True, text=True
    ).stdout
    flat = " ".join(text.split())
    assert all(name in flat for name in BUILTIN)
    assert f"{BLOCK_SHAPE[1]}x{BLOCK_SHAPE[0]} blocks" in flat and "1x4" not in flat
    sim = " ".join(
        subprocess.run(
            [sys.executable, "-m", "coordinator", "simulate", "--help"], capture_output=True, text=True
        ).stdout.split()
    )
    assert "default sim" in sim and "default default" not in sim


def test_tables_keep_ids_whole_at_80_columns(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    ids = [f"20261201-2{i:05d}-ab{i:02d}" for i in range(4)]
    output.table(
        "runs",
        ["run", "kind", "fleet", "state", "created", "rounds", "accuracy", "sparsity", "note"],
        [
            [
                r,
                "train",
                "a-long-fleet-name",
                "done",
                "2026-12-01 20:00",
                10,
                "97.22%",
                "80.0%",
                "a long device-supplied note " * 3,
            ]
            for r in ids
        ],
    )
    out = capsys.readouterr().out
    assert all(r in out for r in ids), out
    assert max(len(line) for line in out.splitlines()) <= 80
    monkeypatch.delenv("COLUMNS")
    output.table(None, ["artifact", "bytes"], [["model-sparse-int8-qat-block", 123]])  # piped: plain, natural width
    out = capsys.readouterr().out
    assert "model-sparse-int8-qat-block" in out and "─" not in out and "┃" not in out


def test_device_text_is_never_markup(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "120")
    evil = "update rejected: tensor [/x] [bold]name[/bold] [/]"
    r = Reporter()
    r.say(evil)
    r.warn(evil)
    r.round_done(
        {
            "round": 1,
            "clients_ok": 0,
            "clients_selected": 1,
            "sparsity": 0.0,
            "wall_s": 1.0,
            "failures": 1,
            "failure_reasons": {"pi1": evil},
            "applied": False,
        }
    )
    err = capsys.readouterr().err
    assert err.count("[/x]") == 3 and "NOT APPLIED" in err
    output.table("client failures", ["round", "device", "error"], [[1, "pi1", evil]])
    assert "[bold]name[/bold]" in capsys.readouterr().out


def test_run_ids_by_prefix_suffix_latest_and_ambiguity(tmp_path):
    store = Store(tmp_path)
    for rid in ("20261201-100000-aaaa", "20261201-110000-bbbb", "20261202-090000-aacc"):
        store.create_run(rid, "f", "train", {})
        time.sleep(0.01)
    assert store.resolve_run("20261201-10")["run_id"] == "20261201-100000-aaaa"
    assert store.resolve_run("bbbb")["run_id"] == "20261201-110000-bbbb"
    assert store.resolve_run("latest")["run_id"] == "20261202-090000-aacc"
    with pytest.raises(RunNotFound, match="matches 2 runs: 20261201-110000-bbbb, 20261201-100000-aaaa"):
        store.resolve_run("20261201")
    with pytest.raises(RunNotFound, match="no run 'zzz'"):
        store.resolve_run("zzz")


def test_resume_refuses_flags_that_contradict_the_run(tmp_path, capsys):
    from dataclasses import asdict

    from coordinator.train import TrainConfig

    store = Store(tmp_path / "home")
    store.create_run(
        "20261201-100000-abcd",
        "lab",
        "train",
        {**asdict(TrainConfig(rounds=4, sparsity=0.5)), "broker": "mqtt://127.0.0.1:9"},
    )
    store.set_run_state("20261201-100000-abcd", "interrupted")
    home = ["--home", str(tmp_path / "home")]
    assert cli.main(["train", "--resume", "abcd", "--rounds", "10", "--json", *home]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert "--rounds 10 contradicts run 20261201-100000-abcd, which has 4" in err["message"]
    assert cli.main(["train", "--resume", "abcd", "--fleet", "default", "--json", *home]) == 2
    assert "which ran on fleet lab" in json.loads(capsys.readouterr().out)["error"]["message"]
    # typed as the README shows it: fleet and broker come from the run (here: a closed port, reported at once)
    assert cli.main(["train", "--resume", "abcd", "--round-timeout", "30", "--json", *home]) == 1
    assert "mqtt://127.0.0.1:9" in json.loads(capsys.readouterr().out)["error"]["message"]


def test_settings_file_and_toml_types(tmp_path, monkeypatch, capsys):
    from edge_agent import settings

    bad = tmp_path / "agent.toml"
    for body, needle in (
        ("fleet = 7\n", "7 is int, expected a string"),
        ("keepalive_s = 2.5\n", "2.5 is float, expected an integer"),
        ('broker = "mqtt//host"\n', "path or query"),
    ):
        bad.write_text(body)
        with pytest.raises(settings.SettingsError, match=needle):
            settings.load({}, str(bad), environ={})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edgeprune.toml").write_text('fleet = "lab"\nbroker = "mqtt://127.0.0.1:9"\n')
    monkeypatch.delenv("EDGEPRUNE_FLEET", raising=False)
    monkeypatch.delenv("EDGEPRUNE_BROKER", raising=False)
    assert cli.main(["devices", "--json", "--home", str(tmp_path / "h")]) == 1  # the file's broker: refused at once
    assert "mqtt://127.0.0.1:9" in json.loads(capsys.readouterr().out)["error"]["message"]
    (tmp_path / "edgeprune.toml").write_text('flet = "lab"\n')
    assert cli.main(["devices", "--json"]) == 2
    assert "unknown key(s) flet" in json.loads(capsys.readouterr().out)["error"]["message"]


def test_completion_script_is_valid_bash():
    script = cli.completion_script(cli.build_parser(), "bash")
    proc = subprocess.run(
        [
            "bash",
            "-c",
            script + "\nCOMP_WORDS=(edgeprune train --res); COMP_CWORD=2; _edgeprune; " 'echo "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["--resume"], proc.stderr


# -- against a real fleet ------------------------------------------------------------------


def _edgeprune(home, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_fleet_that_cannot_train_stops_at_once(mosquitto, agents, tmp_path):
    """A typo'd fleet, unknown --devices, devices without data: exit 1 within seconds, no run stored,
    and the message names what to fix."""
    agents(mosquitto.url, "pi1", "demo")  # no --data
    agents(mosquitto.url, "pi2", "demo")
    home = tmp_path / "home"
    url = ["--broker", mosquitto.url]
    assert wait_until(
        lambda: json.loads(_edgeprune(home, "devices", *url, "--fleet", "demo", "--json").stdout)["devices"].__len__()
        == 2,
        20,
    )
    t0 = time.monotonic()
    out = _edgeprune(home, "train", *url, "--fleet", "dmeo", "--rounds", "1", "--json")
    assert out.returncode == 1 and time.monotonic() - t0 < 30
    err = json.loads(out.stdout)["error"]
    assert err["code"] == "no_devices" and "demo (2 devices)" in err["message"], err
    out = _edgeprune(home, "train", *url, "--fleet", "demo", "--rounds", "1")
    assert out.returncode == 1
    assert "pi1 will not train: has no training data configured" in out.stderr, out.stderr
    out = _edgeprune(home, "train", *url, "--fleet", "demo", "--devices", "pi-9", "--json")
    assert out.returncode == 1 and "pi-9: not in this fleet" in json.loads(out.stdout)["error"]["message"]
    assert json.loads(_edgeprune(home, "runs", "--json").stdout) == []  # nothing recorded as done (or at all)
    devices = _edgeprune(home, "devices", *url, "--fleet", "demo").stdout
    assert "no (no data)" in devices
    empty = _edgeprune(home, "devices", *url, "--fleet", "dmeo").stdout
    assert "fleets on this broker: demo (2 devices)" in empty
    t0 = time.monotonic()
    ping = _edgeprune(home, "ping", *url, "--fleet", "demo", "--device", "pi-9", "--json")
    assert ping.returncode == 1 and "never been seen" in json.loads(ping.stdout)["error"]["message"]
    assert time.monotonic() - t0 < 15
    logs = json.loads(_edgeprune(home, "logs", "pi1", *url, "--fleet", "demo", "--json").stdout)
    assert any("starting" in line["text"] for line in logs["lines"]), logs


@pytest.mark.slow
def test_wait_for_waits_once_and_a_run_without_an_applied_round_fails(mosquitto, tmp_path):
    """Simulated devices (real agents, synthetic trainer): --wait-for 3 with 2 devices waits its timeout
    once, then goes on (min-clients allows it); a round whose updates miss --round-timeout is not applied,
    and a run where no round applied ends failed with exit 1."""
    home = tmp_path / "home"
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator",
            "simulate",
            "--broker",
            mosquitto.url,
            "--fleet",
            "sim",
            "--devices",
            "2",
            "--processes",
            "1",
            "--delay",
            "4",
            "--heartbeat-s",
            "1",
            "--json",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert json.loads(sim.stdout.readline())["connected"] == 2
        common = [
            "--broker",
            mosquitto.url,
            "--fleet",
            "sim",
            "--eval-data",
            "none",
            "--input-shape",
            "8",
            "8",
            "1",
            "--num-classes",
            "10",
            "--sparsity",
            "0.5",
            "--schedule",
            "constant",
        ]
        t0 = time.monotonic()
        out = _edgeprune(home, "train", *common, "--rounds", "2", "--wait-for", "3", "--wait-timeout", "3", timeout=300)
        took = time.monotonic() - t0
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stderr.count("only 2 of 3 devices ready after 3 s") == 1
        assert took < 3 + 2 * (4 + 6) + 30, took  # one wait, not one per round
        out = _edgeprune(home, "train", *common, "--rounds", "1", "--round-timeout", "1", "--json", timeout=300)
        assert out.returncode == 1, out.stdout[-2000:]
        body = json.loads(out.stdout)
        assert body["error"]["code"] == "no_round_applied" and body["run"]["state"] == "failed"
        assert "no update within --round-timeout 1 s" in body["error"]["message"]
        runs = json.loads(_edgeprune(home, "runs", "--json").stdout)
        assert [r["state"] for r in runs] == ["failed", "done"]
        show = _edgeprune(home, "show", "latest").stdout
        assert "FAILED" in show and "not applied" in show
    finally:
        sim.terminate()
        sim.wait(60)


def test_every_train_flag_comes_from_the_config_table_with_its_choices_and_default():
    from coordinator.cli.train import _train_config, config_flags
    from coordinator.train import TrainConfig

    parser = cli.build_parser()
    args = parser.parse_args(["train"])
    assert _train_config(args) == TrainConfig()  # every default, through the flags, is the config's
    train_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    actions = {a.dest: a for a in train_parser._actions}
    for f in TrainConfig.table():
        action = actions[TrainConfig.flag_of(f)]
        assert f.metadata["help"] in action.help and action.choices == f.metadata["choices"], f.name
    assert set(config_flags().values()) == {f.name for f in TrainConfig.table()}
    for f in TrainConfig.table():  # a value outside a field's choices is refused by name, not just by argparse
        if f.metadata["choices"]:
            with pytest.raises(ValueError, match="--" + TrainConfig.flag_of(f).replace("_", "-")):
                TrainConfig(**{f.name: "no-such-choice"}).validate()
    custom = _train_config(
        parser.parse_args(["train", "--input-shape", "8", "8", "--devices", "a,b", "--wait-for", "2"])
    )
    assert custom.input_shape == (8, 8) and custom.devices == ["a", "b"] and custom.wait_for_devices == 2
