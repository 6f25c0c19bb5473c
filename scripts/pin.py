"""Write edge_agent/constraints.txt: the exact version of every distribution edgeprune[agent,train,coordinator]
needs, as installed in the running environment (the one ./scripts/test just passed in).

    .venv/bin/python scripts/pin.py           # rewrite the file
    .venv/bin/python scripts/pin.py --check   # exit 1 if the environment differs from the file

The file ships in the wheel. ./scripts/test installs with it, device bundles download and install with
it, so the versions a release was tested with are the versions every device of that release runs. To
move to newer dependencies: install them into .venv, run ./scripts/test, then run this.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from coordinator.bundle import pinned_python

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "edge_agent" / "constraints.txt"
EXTRAS = ("agent", "train", "coordinator")
HEADER = """\
# The dependency versions this edgeprune release was tested with (written by scripts/pin.py from the
# environment ./scripts/test passed in). Device bundles for this Python download and install exactly
# these; for another Python pip chooses within pyproject.toml's ranges (untested).
# python: {python}
"""


def closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """Every installed distribution that ``root[extras]`` needs, with its version (root itself aside)."""
    env = default_environment()
    seen: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    todo = [(root, set(extras))]
    while todo:
        name, want = todo.pop()
        if (canonicalize_name(name), frozenset(want)) in visited:
            continue
        visited.add((canonicalize_name(name), frozenset(want)))
        dist = md.distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(
                req.marker.evaluate({**env, "extra": e}) for e in (want or {""}) | {""}
            ):
                continue
            key = canonicalize_name(req.name)
            if key == canonicalize_name(root):  # edgeprune[train] inside edgeprune[coordinator]
                todo.append((root, set(req.extras)))
                continue
            try:
                version = md.version(req.name)
            except md.PackageNotFoundError:
                continue  # not for this platform / Python
            seen[key] = version
            todo.append((req.name, set(req.extras)))
    return dict(sorted(seen.items()))


def render(pins: dict[str, str]) -> str:
    python = "%d.%d" % sys.version_info[:2]
    return HEADER.format(python=python) + "".join(f"{name}=={version}\n" for name, version in pins.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = ap.parse_args()
    text = render(closure("edgeprune", EXTRAS))
    if args.check:
        here = "%d.%d" % sys.version_info[:2]
        if pinned_python(OUT.read_text()) != here:
            print(f"{OUT.name} pins Python {pinned_python(OUT.read_text())}, this is {here}: not compared")
            return 0
        if OUT.read_text() != text:
            print(f"{OUT} differs from this environment: run {Path(sys.argv[0]).name} to rewrite it", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count('==')} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
