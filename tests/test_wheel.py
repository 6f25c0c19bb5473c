"""The package as a user gets it: the sdist and wheel built with `python -m build`, the wheel installed
into a fresh virtualenv outside the source tree, and from that install alone the main job (a broker, two
agents, a 2-round train, export, bench, report) and a Pi bundle."""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from coordinator import agentwheel, bundle
from coordinator import broker as broker_mod
from tests.helpers import venvlink

ROOT = Path(__file__).resolve().parent.parent


def _git_files(*parts: str) -> set[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--", *parts], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: the list of source files comes from git")
    return {f for f in out.stdout.split() if (ROOT / f).is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """sdist and wheel from a copy of the sources (`python -m build`: the wheel is built from the sdist)."""
    tmp = tmp_path_factory.mktemp("dist")
    src = agentwheel.copy_sources(ROOT, tmp / "src")
    out = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (sdist,) = (tmp / "dist").glob("edgeprune-*.tar.gz")
    (whl,) = (tmp / "dist").glob("edgeprune-*.whl")
    return sdist, whl


def test_the_wheel_and_sdist_hold_every_module_and_file_the_package_needs(built):
    sdist, whl = built
    from edge_agent import __version__

    assert whl.name == f"edgeprune-{__version__}-py3-none-any.whl"
    shipped = _git_files("edge_agent", "coordinator")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        meta = z.read(f"edgeprune-{__version__}.dist-info/METADATA").decode()
    missing = sorted(f for f in shipped if f not in names)
    assert not missing, f"not in the wheel: {missing}"
    assert "edge_agent/constraints.txt" in names and "edge_agent/installer/install.sh" in names
    for field in ("License-Expression: Apache-2.0", "Requires-Python: >=3.10", "Keywords:", "Classifier:"):
        assert field in meta, field
    assert "Description-Content-Type: text/markdown" in meta and "# edgeprune" in meta
    with tarfile.open(sdist) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    missing = sorted(f for f in shipped | {"LICENSE", "README.md", "pyproject.toml"} if f not in in_sdist)
    assert not missing, f"not in the sdist: {missing}"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process's whole session (an agent's training worker too), SIGKILL after 20 s."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def test_a_wheel_put_back_together_from_an_install_has_the_original_files_and_refuses_a_changed_one(built, tmp_path):
    import importlib.metadata

    _, whl = built
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target), str(whl)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (info,) = target.glob("edgeprune-*.dist-info")
    dist = importlib.metadata.PathDistribution(info)
    again = agentwheel.from_installed(dist, tmp_path / "again")
    assert again.name == whl.name and agentwheel.contents(again) == agentwheel.contents(whl)
    assert agentwheel.from_installed(dist, tmp_path / "twice").read_bytes() == again.read_bytes()  # reproducible
    (target / "edge_agent" / "daemon.py").write_text("# changed after the install\n")
    with pytest.raises(agentwheel.WheelError, match="edge_agent/daemon.py changed after"):
        agentwheel.from_installed(dist, tmp_path / "changed")


@pytest.mark.slow
@pytest.mark.tf
def test_from_a_clean_virtualenv_the_installed_wheel_runs_the_main_job_and_builds_a_pi_bundle(built, tmp_path):
    _, whl = built
    work = tmp_path / "user"  # outside the source tree: nothing of the checkout can be imported from here
    work.mkdir()
    venv = work / "venv"
    try:
        _install_and_run_from(whl, work, venv)
    finally:  # copied files, where hard links were not possible, can be GBs: gone even when the test fails
        shutil.rmtree(venv, ignore_errors=True)


def _install_and_run_from(whl: Path, work: Path, venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # the wheel's dependencies, at the tested versions, as hard links (tests/helpers/venvlink.py says why)
    name, version = whl.name.split("-")[:2]
    with zipfile.ZipFile(whl) as z:
        meta = email.parser.HeaderParser().parsestr(z.read(f"{name}-{version}.dist-info/METADATA").decode())
    needed = venvlink.closure(meta.get_all("Requires-Dist") or [], {"agent", "coordinator"}, name)
    assert "tensorflow" in needed and "pytest" not in needed and "selenium" not in needed, sorted(needed)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    venvlink.link_into(needed, site)  # copies where hard links cannot go (another file system)
    install = subprocess.run(
        [
            str(venv / "bin/python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-index",  # everything it needs is there, or the install fails
            f"{whl}[agent,coordinator]",
            "--constraint",
            str(ROOT / "edge_agent" / "constraints.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    bin_ = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGEPRUNE_CONFIG", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", EDGEPRUNE_HOME=str(work / "home"), HOME=str(work))
    env["EDGEPRUNE_WHEEL_CACHE"] = os.environ.get("EDGEPRUNE_WHEEL_CACHE") or str(
        bundle.wheel_cache(bundle.Platform.parse("aarch64", "3.11")).parent
    )

    def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([*args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)

    where = run(
        str(bin_ / "python"), "-c", "import coordinator, edge_agent; print(coordinator.__file__, edge_agent.__file__)"
    )
    assert where.returncode == 0 and str(ROOT) not in where.stdout and str(venv) in where.stdout, where
    from edge_agent import __version__

    for exe, name in (("edgeprune", "edgeprune"), ("edgeprune-agent", "edgeprune-agent")):
        out = run(str(bin_ / exe), "--version")
        assert out.returncode == 0 and out.stdout.strip() == f"{name} {__version__}", out

    port = broker_mod.free_port()
    url = f"mqtt://127.0.0.1:{port}"
    agent = ["run", "--broker", url, "--fleet", "wheel", "--data", "digits", "--train-threads", "1"]
    commands = [[str(bin_ / "edgeprune"), "broker", "--port", str(port)]] + [
        [str(bin_ / "edgeprune-agent"), *agent, "--device-id", f"pi{i}", "--data-shard", f"{i}/2",
         "--state-dir", str(work / f"agent-{i}"), "--heartbeat-s", "0.5"]
        for i in range(2)
    ]  # fmt: skip
    procs: list[subprocess.Popen] = []
    try:
        for i, command in enumerate(commands):
            with open(work / f"process-{i}.log", "w") as log:  # each in its own session: killed whole below
                procs.append(
                    subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=log, start_new_session=True)
                )
            if i == 0:
                assert broker_mod.wait_for_port("127.0.0.1", port, 30), (work / "process-0.log").read_text()[-2000:]
        common = ["--broker", url, "--fleet", "wheel", "--json"]
        out = run(str(bin_ / "edgeprune"), "train", *common, "--rounds", "2", "--sparsity", "0.5", "--wait-for", "2")
        assert out.returncode == 0, out.stderr[-3000:]
        trained = json.loads(out.stdout)
        assert trained["state"] == "done" and len(trained["rounds"]) == 2
        out = run(str(bin_ / "edgeprune"), "export", trained["run_id"], "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["artifacts"], out.stderr[-2000:]
        out = run(str(bin_ / "edgeprune"), "bench", *common, "--model", trained["run_id"], "--runs", "20")
        assert out.returncode == 0, out.stderr[-2000:]
        assert all(r["status"] == "ok" for d in json.loads(out.stdout)["devices"].values() for r in d["artifacts"])
        listed = run(str(bin_ / "edgeprune"), "devices", *common)
        assert listed.returncode == 0, listed.stderr[-2000:]
        devices = json.loads(listed.stdout)["devices"]
        assert sorted(d["caps"]["agent_version"] for d in devices) == [__version__] * 2, devices
        out = run(str(bin_ / "edgeprune"), "report", trained["run_id"], "--html", str(work / "report.html"))
        assert out.returncode == 0 and "final accuracy" in out.stdout and (work / "report.html").stat().st_size > 10_000
    finally:
        for p in reversed(procs):
            _stop(p)

    cache = Path(env["EDGEPRUNE_WHEEL_CACHE"]) / "aarch64-cp311"
    if not any(cache.glob("ai_edge_litert-*.whl")):
        pytest.skip(f"no aarch64 wheels in {cache} (./scripts/test fills it as root for the emulated Pi)")
    out = run(
        str(bin_ / "edgeprune"),
        "flash",
        "--bundle",
        str(work / "pi.tar.gz"),
        "--arch",
        "aarch64",
        "--python",
        "3.11",
        "--offline",
        "--json",
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    manifest = json.loads(out.stdout)
    assert manifest["edgeprune"] == __version__ and manifest["wheel_from"] == "installed"
    assert manifest["versions"]["numpy"] in (ROOT / "edge_agent" / "constraints.txt").read_text()
    with tarfile.open(work / "pi.tar.gz") as t:
        member = next(m for m in t.getmembers() if m.name.endswith(whl.name))
        (work / "from-bundle.whl").write_bytes(t.extractfile(member).read())
    assert agentwheel.contents(work / "from-bundle.whl") == agentwheel.contents(whl)  # byte for byte, RECORD aside


def test_a_bundle_wheel_from_a_checkout_with_uncommitted_changes_is_a_development_build(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    src = agentwheel.copy_sources(ROOT, tmp_path / "checkout")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    git += ["-c", "core.hooksPath=/dev/null"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "release"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    clean = agentwheel.build(tmp_path / "clean", src)
    assert (clean.source, clean.development) == ("checkout", False)
    (src / "edge_agent" / "daemon.py").write_text((src / "edge_agent" / "daemon.py").read_text() + "\n# local change\n")
    dirty = agentwheel.build(tmp_path / "dirty", src)
    assert (dirty.source, dirty.development) == ("checkout", True)
    assert agentwheel.contents(dirty.path) != agentwheel.contents(clean.path)
