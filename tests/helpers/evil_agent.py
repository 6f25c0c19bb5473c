"""A real agent (same daemon, same protocol) whose training commands send bad updates.

EVIL_MODE: nan (NaN weights), dense (a mask that ignores the round's sparsity),
shape (a tensor missing). Used to prove the coordinator rejects such updates.
"""

import os
import sys

import numpy as np

from edge_agent import commands  # noqa: F401  (the real commands first; ours replace two of them)
from edge_agent.daemon import command
from edge_agent.protocol import codec
from edge_agent.protocol.args import TrainBegin, TrainRound

MODE = os.environ.get("EVIL_MODE", "nan")
os.environ.setdefault("EDGEPRUNE_DATA", "digits")  # it claims training data like any device that can train


@command("train_begin", mode="job", args=TrainBegin)
def _begin(agent, cmd, a: TrainBegin):
    return {"num_samples": 100, "dataset": f"evil-{MODE}"}


@command("train_round", mode="job", args=TrainRound)
def _round(agent, cmd, a: TrainRound):
    g = codec.decode(agent.fetch_blob(a.model.sha256, 60))
    tensors, masks, names = [t.copy() for t in g.tensors], list(g.masks), list(g.names)
    if MODE == "nan":
        tensors[-1][...] = np.nan
    elif MODE == "dense":
        masks = [np.ones(t.shape, bool) if m is not None else None for t, m in zip(tensors, masks)]
        tensors = [t + 0.01 for t in tensors]
    elif MODE == "shape":
        tensors, masks, names = tensors[:-1], masks[:-1], names[:-1]
    update = codec.encode(
        tensors,
        names=names,
        masks=masks,
        kind="update",
        values="fp32",
        meta={"run_id": a.run_id, "round": a.round},
    )
    sha = agent.blobs.put(update)
    return {
        "run_id": a.run_id,
        "round": a.round,
        "update": {"sha256": sha, "bytes": len(update)},
        "metrics": {"num_samples": 100},
    }


if __name__ == "__main__":
    from edge_agent.cli import main

    sys.exit(main())
