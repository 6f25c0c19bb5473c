"""What every aggregation strategy shares: how a tensor is described and how an update is refused."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.protocol.errors import EdgepruneError


class UpdateRejected(EdgepruneError, ValueError):
    """An update that must not be aggregated (NaN/Inf, wrong shape, mask breaks the round's target)."""

    code = "update_rejected"


@dataclass
class TensorInfo:
    name: str
    kind: str | None  # None: not pruned (dense); else "unstructured", "block16x1" or "2:4"
