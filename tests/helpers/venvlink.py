"""A fresh virtualenv that gets a wheel's dependencies as hard links to the ones this interpreter has.

Installing edgeprune[agent,coordinator] for real puts another TensorFlow (about 2.5 GB) on the disk, and
CI ran out of space doing it. The dependencies this test environment has are the tested versions (the
dev venv is installed with edge_agent/constraints.txt), so the fresh venv gets exactly those: the files
of every distribution in the wheel's own requirement closure (its Requires-Dist for the extras asked for,
then theirs, markers evaluated) are hard-linked in, nothing else of this environment is (no pytest, no
selenium, no editable edgeprune). pip then installs the wheel itself with --no-index: it checks that
what is there satisfies the wheel's requirements and the constraints, exactly as it would after a
download, and fails on a requirement the closure lacks.
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(requires: list[str], extras: set[str], own_name: str) -> dict[str, metadata.Distribution]:
    """The distributions (of this interpreter) that ``requires`` with ``extras`` needs, transitively."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), frozenset(extras)) for r in requires]
    while todo:
        req, context = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (context or {""})):
            continue
        name, wanted = canonicalize_name(req.name), frozenset(req.extras)
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        if name == canonicalize_name(own_name):  # edgeprune[train] inside edgeprune[coordinator]
            todo += [(Requirement(r), wanted) for r in requires]
            continue
        dist = found[name] = metadata.distribution(req.name)  # PackageNotFoundError: not here either
        todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return found


def link_into(dists: dict[str, metadata.Distribution], site_packages: Path) -> None:
    """Hard-link (copy across file systems) every file of ``dists`` under ``site_packages``, after removing
    the venv's own copy of any of them (a new venv's setuptools). Scripts outside site-packages (bin/)
    are left out: pip writes the wheel's own."""
    for own in metadata.distributions(path=[str(site_packages)]):
        if canonicalize_name(own.metadata["Name"]) in dists:
            for f in own.files or []:
                Path(own.locate_file(f)).unlink(missing_ok=True)
            shutil.rmtree(Path(str(own._path)), ignore_errors=True)  # type: ignore[attr-defined]
    for dist in dists.values():
        root = Path(dist.locate_file("")).resolve()
        for f in dist.files or []:
            src = Path(dist.locate_file(f)).resolve()
            try:
                rel = src.relative_to(root)
            except ValueError:
                continue
            if ".." in f.parts or not src.is_file():
                continue
            dst = site_packages / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except FileExistsError:
                pass
            except OSError:
                shutil.copy2(src, dst)
