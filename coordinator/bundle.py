"""Offline agent bundles: the edgeprune wheel plus every dependency wheel for one device platform.

A bundle is a ``.tar.gz`` a device installs with no network: ``wheels/`` (built
here, or downloaded by pip for the *device's* architecture and Python, never the
laptop's), ``install.sh`` (venv + ``pip --no-index`` + hand-over to
``edge_agent.service``), ``uninstall.sh`` and ``manifest.json``. pip does the
resolution (``pip download --only-binary=:all: --platform ...``); downloaded
wheels are kept in a per-platform cache so the second bundle for a platform
needs no network at all (``offline=True`` enforces that).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge_agent.protocol.errors import EdgepruneError

from . import __version__, agentwheel

BUNDLE_FORMAT = 1
CONSTRAINTS = "edge_agent/constraints.txt"  # in the wheel: the dependency versions a release was tested with

# manylinux tags pip may pick for each machine, oldest first; filtered by the device's glibc.
_MANYLINUX_ARCH = {
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "armv7l": "armv7l",
    "armv6l": "armv6l",
    "riscv64": "riscv64",
}
DEFAULT_GLIBC = (2, 36)  # Debian 12 Bookworm = Raspberry Pi OS Bookworm


class BundleError(EdgepruneError, RuntimeError):
    """Building a bundle failed; the message names the package or step and the fix.
    ``code`` is "no_wheels" when pip found no binary for the platform."""

    def __init__(self, message: str, code: str = "bundle"):
        super().__init__(message, code)


@dataclass(frozen=True)
class Platform:
    arch: str  # as `uname -m` prints it, normalised (aarch64, x86_64, armv7l...)
    python: str  # "3.11"
    glibc: tuple[int, int] = DEFAULT_GLIBC

    @classmethod
    def parse(cls, arch: str, python: str, glibc: str | tuple[int, int] | None = None) -> "Platform":
        machine = _MANYLINUX_ARCH.get(arch.lower())
        if machine is None:
            raise BundleError(
                f"unknown architecture {arch!r}; known: {', '.join(sorted(set(_MANYLINUX_ARCH.values())))}"
            )
        if not re.fullmatch(r"3\.\d{1,2}", python):
            raise BundleError(f"--python must look like 3.11, not {python!r}")
        if isinstance(glibc, str):
            m = re.fullmatch(r"(\d+)\.(\d+)", glibc.strip())
            if not m:
                raise BundleError(f"glibc version must look like 2.36, not {glibc!r}")
            glibc = (int(m.group(1)), int(m.group(2)))
        return cls(machine, python, glibc or DEFAULT_GLIBC)

    @property
    def tag(self) -> str:
        return f"{self.arch}-cp{self.python.replace('.', '')}"

    def pip_platforms(self) -> list[str]:
        tags = [f"manylinux_2_{minor}_{self.arch}" for minor in range(17, self.glibc[1] + 1)]
        if self.arch in ("aarch64", "x86_64"):
            tags.append(f"manylinux2014_{self.arch}")
        tags.append(f"linux_{self.arch}")
        return tags


def wheel_cache(platform: Platform) -> Path:
    """Downloaded device wheels, shared by every coordinator home [env EDGEPRUNE_WHEEL_CACHE]."""
    base = os.environ.get("EDGEPRUNE_WHEEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgeprune", "wheels"
    )
    return Path(base) / platform.tag


def _run_pip(args: list[str], what: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise _PipFailed(what, proc.stdout + proc.stderr)
    return proc.stdout


class _PipFailed(Exception):
    def __init__(self, what: str, output: str):
        super().__init__(what)
        self.what = what
        self.output = output


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _missing_package(output: str) -> str | None:
    m = re.search(r"No matching distribution found for ([^\s;]+)", output)
    return m.group(1) if m else None


def download_wheels(
    project_wheel: Path,
    extras: list[str],
    platform: Platform,
    cache: Path,
    dest: Path,
    offline: bool,
    constraints: Path | None = None,
) -> None:
    """Resolve ``edgeprune[extras]`` for the device's platform into ``dest`` (pip decides what, within
    ``constraints``: the versions the release was tested with).

    Tries the wheel cache alone first; goes to the index only for what is missing,
    then adds the new files to the cache.
    """
    cache.mkdir(parents=True, exist_ok=True)
    req = f"{project_wheel}[{','.join(extras)}]" if extras else str(project_wheel)
    base = [
        "download",
        "-q",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        platform.python,
        "-d",
        str(dest),
        "--find-links",
        str(cache),
        "--find-links",
        str(project_wheel.parent),
    ]
    for tag in platform.pip_platforms():
        base += ["--platform", tag]
    if constraints is not None:
        base += ["--constraint", str(constraints)]
    targets = [req, "pip"]  # pip's own wheel: installs into a venv made --without-pip (no python3-venv needed)
    try:
        _run_pip([*base, "--no-index", *targets], "resolve from the wheel cache")
    except _PipFailed as cached:
        if offline:
            missing = _missing_package(cached.output)
            raise BundleError(
                f"no {platform.arch} / Python {platform.python} wheel of {missing or 'a dependency'} in the wheel cache "
                f"{cache} and offline mode is on. Build the bundle once with network access "
                f"(edgeprune flash --bundle OUT --arch {platform.arch} --python {platform.python}), "
                f"or put the wheel in the cache.",
                code="no_wheels",
            ) from None
        try:
            _run_pip([*base, *targets], "download wheels")
        except _PipFailed as exc:
            missing = _missing_package(exc.output)
            if missing:
                raise BundleError(
                    f"no wheel of {missing} exists for {platform.arch} / CPython {platform.python} "
                    f"(glibc {platform.glibc[0]}.{platform.glibc[1]}): pip found no binary for that platform. "
                    f"Use a 64-bit OS on the device (Raspberry Pi OS Bookworm 64-bit = aarch64, Python 3.11), "
                    f"or put a wheel you built for it into {cache}.",
                    code="no_wheels",
                ) from None
            raise BundleError(f"pip download failed for {platform.tag}:\n{_tail(exc.output)}") from None
    for whl in dest.glob("*.whl"):
        if whl.name.startswith("edgeprune-"):
            continue
        target = cache / whl.name
        if not target.exists():
            shutil.copy2(whl, target)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundle_name(platform: Platform, train: bool, version: str = __version__) -> str:
    return f"edgeprune-agent-{version}-{platform.tag}{'-train' if train else ''}"


def build(
    platform: Platform,
    out: Path,
    *,
    train: bool = False,
    cache: Path | None = None,
    offline: bool = False,
    say=lambda msg: None,
    source_root: Path = agentwheel.PROJECT_ROOT,
) -> dict:
    """Write the bundle to ``out`` and return its manifest."""
    extras = ["agent"] + (["train"] if train else [])
    cache = cache or wheel_cache(platform)
    with tempfile.TemporaryDirectory(prefix="edgeprune-bundle-") as tmp:
        tmp = Path(tmp)
        wheels = tmp / "wheels"
        wheels.mkdir()
        try:
            agent = agentwheel.build(tmp / "project", source_root)
        except agentwheel.WheelError as exc:
            raise BundleError(str(exc)) from None
        say(
            f"edgeprune {agent.version} wheel from the {'installed distribution' if agent.source == 'installed' else 'checkout'}"
            + (" (a development build: the checkout has uncommitted changes)" if agent.development else "")
        )
        project = agent.path
        with zipfile.ZipFile(project) as whl:  # the installer and the pins of the agent being bundled
            names = set(whl.namelist())
            try:
                installers = {s: whl.read(f"edge_agent/installer/{s}") for s in ("install.sh", "uninstall.sh")}
            except KeyError as exc:
                raise BundleError(f"the edgeprune {agent.version} wheel has no installer script: {exc}") from None
            constraints = whl.read(CONSTRAINTS) if CONSTRAINTS in names else b""  # none before 0.1.0's packaging
        tested = pinned_python(constraints.decode())
        if tested != platform.python:  # pip evaluates the pins for the laptop's Python, not the device's
            why = f"they are for {tested}" if tested else f"edgeprune {agent.version} ships none"
            say(f"no tested pins for Python {platform.python} ({why}): pip chooses the versions")
            constraints = f"# no tested pins for Python {platform.python} ({why})\n".encode()
        (tmp / "constraints.txt").write_bytes(constraints)
        say(f"collecting wheels for {platform.arch} / Python {platform.python} ({', '.join(extras)})")
        download_wheels(project, extras, platform, cache, wheels, offline, tmp / "constraints.txt")
        if not any(wheels.glob("edgeprune-*.whl")):
            shutil.copy2(project, wheels / project.name)
        files = sorted(wheels.glob("*.whl"))
        entries = [{"file": f.name, "sha256": _sha256(f), "bytes": f.stat().st_size} for f in files]
        bundle_id = hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest()[:16]
        versions = pinned_versions(files)
        say(
            ("tested versions (edge_agent/constraints.txt): " if tested == platform.python else "versions: ")
            + ", ".join(f"{k} {v}" for k, v in versions.items())
        )
        manifest = {
            "format": BUNDLE_FORMAT,
            "edgeprune": agent.version,
            "build": "development" if agent.development else "release",
            "wheel_from": agent.source,
            "bundle_id": bundle_id,
            "arch": platform.arch,
            "python": platform.python,
            "glibc": "%d.%d" % platform.glibc,
            "extras": extras,
            "versions": versions,
            "pinned": tested == platform.python,  # the versions are the tested ones (constraints.txt)
            "wheels": entries,
            "wheel_bytes": sum(e["bytes"] for e in entries),
        }
        name = bundle_name(platform, train, agent.version)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w:gz", compresslevel=1) as tar:  # wheels are zips already
            _add_bytes(tar, f"{name}/manifest.json", json.dumps(manifest, indent=2).encode(), 0o644)
            _add_bytes(tar, f"{name}/constraints.txt", constraints, 0o644)
            for script, data in installers.items():
                _add_bytes(tar, f"{name}/{script}", data, 0o755)
            for f in files:
                tar.add(f, arcname=f"{name}/wheels/{f.name}")
        os.replace(partial, out)  # never leave a truncated bundle where a good one is expected
        manifest["path"] = str(out)
        manifest["dir"] = name
        manifest["bundle_bytes"] = out.stat().st_size
        return manifest


def pinned_python(constraints: str) -> str | None:
    """The Python version a constraints file was written for (its ``# python: X.Y`` line)."""
    for line in constraints.splitlines():
        if line.startswith("# python: "):
            return line.removeprefix("# python: ").strip()
    return None


def pinned_versions(wheels: list[Path]) -> dict[str, str]:
    """Each bundled distribution's version, from its wheel's file name: what the device will run."""
    out = {}
    for f in wheels:
        name, version = f.name.split("-")[:2]
        out[name.lower().replace("_", "-")] = version
    return dict(sorted(out.items()))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def cached_build(
    platform: Platform, home: Path, *, train: bool = False, offline: bool = False, say=lambda msg: None
) -> dict:
    """Reuse the bundle for this platform + source if it exists, else build it."""
    key = f"{bundle_name(platform, train)}-glibc{platform.glibc[0]}.{platform.glibc[1]}-{agentwheel.source_digest()}"
    path = home / "bundles" / f"{key}.tar.gz"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        manifest = json.loads(meta.read_text())
        manifest["reused"] = True
        say(f"reusing bundle {path.name}")
        if manifest.get("versions"):
            say("versions: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))
        return manifest
    for old in (home / "bundles").glob(f"{bundle_name(platform, train)}-glibc*"):  # older source versions
        old.unlink(missing_ok=True)
    manifest = build(platform, path, train=train, offline=offline, say=say)
    meta.write_text(json.dumps(manifest, indent=2))
    manifest["reused"] = False
    return manifest


def read_manifest(bundle: Path) -> dict:
    """The manifest of an existing bundle file (for --from-bundle)."""
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            for member in tar.getmembers():
                if member.name.endswith("/manifest.json") and member.name.count("/") == 1:
                    manifest = json.load(tar.extractfile(member))
                    manifest["path"] = str(bundle)
                    manifest["dir"] = member.name.split("/")[0]
                    manifest["bundle_bytes"] = bundle.stat().st_size
                    return manifest
    except (OSError, tarfile.TarError, json.JSONDecodeError) as exc:
        raise BundleError(f"{bundle} is not an edgeprune bundle: {exc}") from None
    raise BundleError(f"{bundle} is not an edgeprune bundle: no manifest.json")
