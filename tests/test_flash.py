"""Flashing, the parts that need no device: targets, SSH error diagnosis, platforms, bundle errors.

The end-to-end flash of an emulated arm64 Raspberry Pi is in test_flash_emulated.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coordinator import bundle
from coordinator.flash import check
from coordinator.ssh import FlashError, Target, ssh_error


@pytest.mark.parametrize(
    "text,user,host,port",
    [
        ("pi@raspberrypi.local", "pi", "raspberrypi.local", None),
        ("ssh://pi@10.0.0.5:2222", "pi", "10.0.0.5", 2222),
        ("ssh://root@[fe80::1]:22/", "root", "fe80::1", 22),
        ("my-pi", None, "my-pi", None),  # a Host alias from ~/.ssh/config
    ],
)
def test_target_parse(text, user, host, port):
    t = Target.parse(text)
    assert (t.user, t.host, t.port) == (user, host, port)


@pytest.mark.parametrize("bad", ["", "pi@", "pi@host:notaport", "http://pi@host", "a b@c"])
def test_target_parse_refuses(bad):
    with pytest.raises(FlashError) as err:
        Target.parse(bad)
    assert err.value.code == "usage"


@pytest.mark.parametrize(
    "stderr,code,hint",
    [
        ("ssh: connect to host 10.0.0.9 port 22: Connection refused", "unreachable", "SSH server"),
        ("ssh: Could not resolve hostname nope.local: Name or service not known", "unreachable", "network"),
        ("ssh: connect to host 10.9.9.9 port 22: Connection timed out", "unreachable", "powered"),
        ("pi@10.0.0.5: Permission denied (publickey,password).", "auth", "ssh-copy-id"),
        ("Host key verification failed.", "host_key", "ssh-keygen -R"),
    ],
)
def test_ssh_errors_name_the_problem_and_the_fix(stderr, code, hint):
    err = ssh_error(Target.parse("pi@10.0.0.5"), stderr)
    assert err.code == code and hint in str(err)


def test_device_checks():
    t = Target.parse("pi@h")
    ok = {"python": "3.11.2", "broker": "ok"}
    check(ok, t, "python3", "mqtt://h:1883")
    for info, code in [
        ({"python": "", "broker": "ok"}, "no_python"),
        ({"python": "3.9.2", "broker": "ok"}, "old_python"),
        ({"python": "3.11.2", "broker": "[Errno 111] Connection refused"}, "broker_unreachable"),
    ]:
        with pytest.raises(FlashError) as err:
            check(info, t, "python3", "mqtt://h:1883")
        assert err.value.code == code


def test_platform_tags_follow_the_device_glibc():
    p = bundle.Platform.parse("aarch64", "3.11", "2.31")
    tags = p.pip_platforms()
    assert "manylinux_2_31_aarch64" in tags and "manylinux_2_34_aarch64" not in tags
    assert "manylinux2014_aarch64" in tags and p.tag == "aarch64-cp311"
    assert bundle.Platform.parse("arm64", "3.11").arch == "aarch64"
    for args in [("sparc", "3.11"), ("aarch64", "3"), ("aarch64", "3.11", "glibc")]:
        with pytest.raises(bundle.BundleError):
            bundle.Platform.parse(*args)


def test_offline_bundle_without_cached_wheels_fails_clearly(tmp_path):
    """No network in tests: an empty wheel cache + --offline must say what is missing and how to fix it."""
    out = tmp_path / "b.tar.gz"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "flash",
            "--bundle",
            str(out),
            "--arch",
            "armv7l",
            "--python",
            "3.11",
            "--offline",
            "--json",
        ],
        capture_output=True,
        text=True,
        env={"EDGEPRUNE_WHEEL_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 1, proc.stderr
    err = json.loads(proc.stdout)["error"]
    assert err["code"] == "no_wheels" and "armv7l" in err["message"] and "offline" in err["message"]
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_flash_usage_errors(tmp_path):
    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "coordinator.cli", "flash", *a, "--json"], capture_output=True, text=True
        )

    proc = run("pi@h")
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "usage"
    proc = run("pi@h", "--bundle", str(tmp_path / "x.tar.gz"))
    assert proc.returncode == 2 and "not both" in proc.stdout


def test_read_manifest_rejects_non_bundles(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(bundle.BundleError, match="not an edgeprune bundle"):
        bundle.read_manifest(junk)
