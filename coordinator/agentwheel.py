"""The edgeprune wheel a device bundle installs: the very package this coordinator runs.

Two sources, in this order:

- **a source checkout** (``pyproject.toml`` beside the packages): ``pip wheel`` builds it from a
  clean copy of the sources. A git checkout with uncommitted changes is a *development build*, and
  the bundle's manifest says so.
- **an installed distribution** (``pip install edgeprune-*.whl``): the wheel is put back together
  from the installed files and their metadata (``importlib.metadata``): every file the install's
  ``RECORD`` lists under site-packages, with its hash checked against that ``RECORD``, so a file
  changed since the install is refused rather than shipped. The scripts pip generated and pip's own
  bookkeeping (``INSTALLER``, ``REQUESTED``, ``direct_url.json``) are left out; ``RECORD`` is written
  afresh. The result has the original wheel's files, byte for byte (their contents; every file is 0644,
  as setuptools writes them).

Processes: ``pip wheel`` and ``git status``, each run to completion on the caller's thread; pip reads a
copy of the checkout and writes only into ``dest``; git only reads the checkout. No threads.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.protocol.errors import EdgepruneError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SOURCE_PARTS = ("pyproject.toml", "README.md", "LICENSE", "edge_agent", "coordinator")
DISTRIBUTION = "edgeprune"
_PIP_BOOKKEEPING = ("INSTALLER", "REQUESTED", "direct_url.json", "RECORD")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same files give the same wheel


class WheelError(EdgepruneError, RuntimeError):
    def __init__(self, message: str):
        super().__init__(message, "bundle")


@dataclass(frozen=True)
class AgentWheel:
    path: Path
    version: str
    source: str  # "checkout" or "installed"
    development: bool  # a checkout with uncommitted changes


def build(dest: Path, root: Path = PROJECT_ROOT) -> AgentWheel:
    """The edgeprune wheel in ``dest``: built from the checkout at ``root`` when there is one, else
    rebuilt from the installed distribution."""
    dest.mkdir(parents=True, exist_ok=True)
    if (root / "pyproject.toml").is_file():
        path = _from_checkout(dest, root)
        return AgentWheel(path, path.name.split("-")[1], "checkout", _uncommitted(root))
    dist = installed()
    if dist is None:
        raise WheelError(
            f"edgeprune is neither a source checkout at {root} nor an installed distribution: "
            "install it with pip (pip install edgeprune-*.whl) or run it from a git clone"
        )
    return AgentWheel(from_installed(dist, dest), dist.version, "installed", False)


def installed() -> importlib.metadata.Distribution | None:
    """The installed edgeprune distribution, if these modules are its files (not an editable install)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        return None
    here = Path(__file__).resolve()
    if not any(Path(str(dist.locate_file(f))).resolve() == here for f in dist.files or []):
        return None  # another copy is installed; this one runs from elsewhere
    return dist


def from_installed(dist: importlib.metadata.Distribution, dest: Path) -> Path:
    """Put the wheel of ``dist`` back together from its installed files (see the module docstring)."""
    info_dir = next(
        (f.parts[0] for f in dist.files or [] if len(f.parts) == 2 and f.parts[1] == "METADATA"),
        f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info",
    )
    wheel_meta = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    if not tags:
        raise WheelError(f"the installed {DISTRIBUTION} {dist.version} has no WHEEL tags: reinstall it with pip")
    out = dest / f"{info_dir.removesuffix('.dist-info')}-{tags[0]}.whl"
    reinstall = f"reinstall it (pip install --force-reinstall edgeprune-{dist.version}-*.whl) before flashing"
    files = {}
    for f in sorted((f for f in dist.files or [] if _ships(f, info_dir)), key=str):
        try:
            data = Path(str(dist.locate_file(f))).read_bytes()
        except OSError as exc:
            raise WheelError(f"{f} of {DISTRIBUTION} {dist.version} cannot be read ({exc}): {reinstall}") from None
        if f.hash is not None and f.hash.mode == "sha256" and _record_hash(data) != f.hash.value:
            raise WheelError(f"{f} changed after {DISTRIBUTION} {dist.version} was installed: {reinstall}")
        files[str(f).replace("\\", "/")] = data
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:  # never a half-written wheel under the final name
        with _fixed_time_wheel()(Path(tmp) / out.name, "w") as whl:  # writes RECORD from what goes in
            for name, data in files.items():
                whl.writestr(name, data)
        (Path(tmp) / out.name).replace(out)
    return out


def _fixed_time_wheel() -> type:
    """wheel's WheelFile (it hashes what goes in and writes RECORD), with every entry, RECORD included,
    dated _ZIP_DATE: the same files make the same bytes."""
    from wheel.wheelfile import WheelFile

    class FixedTimeWheelFile(WheelFile):  # type: ignore[misc]
        def writestr(self, zinfo_or_arcname: Any, data: Any, compress_type: Any = None) -> None:
            if isinstance(zinfo_or_arcname, str):
                zinfo_or_arcname = zipfile.ZipInfo(zinfo_or_arcname, _ZIP_DATE)
                zinfo_or_arcname.compress_type = zipfile.ZIP_DEFLATED
                zinfo_or_arcname.external_attr = 0o644 << 16
            super().writestr(zinfo_or_arcname, data, compress_type)

    return FixedTimeWheelFile


def _ships(f: importlib.metadata.PackagePath, info_dir: str) -> bool:
    parts = f.parts
    if not parts or parts[0] == ".." or "__pycache__" in parts or f.suffix == ".pyc":
        return False  # console scripts pip wrote into bin/, byte-code compiled at install time
    return not (parts[0] == info_dir and len(parts) == 2 and parts[1] in _PIP_BOOKKEEPING)


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def contents(wheel: Path) -> dict[str, str]:
    """A wheel's files (RECORD aside) and their sha256: what "the same package" compares."""
    with zipfile.ZipFile(wheel) as z:
        return {n: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist() if not n.endswith(".dist-info/RECORD")}


def _from_checkout(dest: Path, root: Path) -> Path:
    """``pip wheel`` of a clean copy of the source (keeps build/ out of the tree)."""
    with tempfile.TemporaryDirectory(prefix="edgeprune-wheel-") as tmp:
        src = copy_sources(root, Path(tmp) / "src")
        # no build isolation: setuptools and wheel come with the coordinator extra, so this works offline
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(dest),
                str(src),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
            raise WheelError(f"building the edgeprune wheel failed:\n{tail}")
    wheels = sorted(dest.glob("edgeprune-*.whl"))
    if not wheels:
        raise WheelError("pip wheel produced no edgeprune wheel")
    return wheels[-1]


def copy_sources(root: Path, dest: Path) -> Path:
    """The files of a checkout that make the package (``SOURCE_PARTS``), copied to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in SOURCE_PARTS:
        p = root / part
        if p.is_dir():
            shutil.copytree(p, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif p.is_file():
            shutil.copy2(p, dest / part)
    return dest


def _uncommitted(root: Path) -> bool:
    """Whether a git checkout has changes to the files that go into the wheel."""
    if not (root / ".git").exists() or shutil.which("git") is None:
        return False
    proc = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", *SOURCE_PARTS], capture_output=True, text=True
    )
    return proc.returncode == 0 and bool(proc.stdout.strip())


def source_digest(root: Path = PROJECT_ROOT) -> str:
    """Hash of what goes into the wheel (a checkout's files, or the installed distribution's RECORD):
    a changed source means a new bundle."""
    h = hashlib.sha256()
    if not (root / "pyproject.toml").is_file():
        dist = installed()
        h.update((dist.read_text("RECORD") or "").encode() if dist is not None else b"unknown")
        return h.hexdigest()[:16]
    for part in SOURCE_PARTS:
        path = root / part
        if not path.exists():
            continue
        files = (
            [path]
            if path.is_file()
            else sorted(
                p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            )
        )
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
