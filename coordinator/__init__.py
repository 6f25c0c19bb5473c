"""edgeprune coordinator: the laptop side that drives a fleet of edge agents.

It depends on :mod:`edge_agent` (for the wire protocol), never the reverse.
"""

from edge_agent import __version__

__all__ = ["__version__"]
