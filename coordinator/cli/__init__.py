"""``edgeprune``: the coordinator command line, one module per command group (flags beside handlers).

The work lives in the modules named after the concept (session, train, export, bench, report...).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from edge_agent.protocol.errors import EdgepruneError

from .. import __version__, output
from . import artifacts, broker, completion, flashing, fleet, runs, simulate, train
from .common import _CONFIG, DESCRIPTION, Parser, UsageError, _explicit, config_file
from .completion import completion_script

__all__ = ["build_parser", "completion_script", "main", "run"]

GROUPS = (broker, fleet, completion, flashing, simulate, train, artifacts, runs)
"""In the order `edgeprune --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edgeprune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _CONFIG.clear()
        _CONFIG.update(config_file()[1])
        parser = build_parser()
        args = parser.parse_args(argv)
    except UsageError as exc:
        return output.fail(str(exc), code="usage", as_json="--json" in argv, status=2)
    args.explicit = _explicit(parser, args, argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        rc = output.fail("interrupted", code="interrupted", as_json=getattr(args, "json", False), status=130)
    except UsageError as exc:
        rc = output.fail(str(exc), code="usage", as_json=getattr(args, "json", False), status=2)
    except EdgepruneError as exc:  # a failure a command did not handle itself: its code and message, no traceback
        rc = output.fail(str(exc), code=str(getattr(exc.code, "value", exc.code)), as_json=getattr(args, "json", False))
    except Exception as exc:  # a bug: keep the traceback for the report, and the one error shape for scripts
        import traceback

        traceback.print_exc()
        rc = output.fail(
            f"internal error: {type(exc).__name__}: {exc} (traceback above; please report it)",
            code="internal",
            as_json=getattr(args, "json", False),
        )
    return rc


def run() -> None:
    """The `edgeprune` console script: :func:`main`, then exit (fast when TensorFlow is loaded)."""
    rc = main()
    if "tensorflow" in sys.modules:
        # TensorFlow's interpreter teardown takes seconds and does nothing for us: every file,
        # the SQLite store and the MQTT session are closed by now. Skip it. (Only here: main()
        # returns normally, so it can be called in-process.)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
