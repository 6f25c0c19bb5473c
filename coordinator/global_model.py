"""The global model on the coordinator: architecture, weights, masks, evaluation.

Holds weights in edgeprune's tensor order (see :mod:`edge_agent.pruning`), the
mask of every pruned tensor, and a compiled tf-keras copy for evaluation on the
held-out set that never leaves the coordinator.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import data as data_mod
from edge_agent import models, pruning
from edge_agent.protocol import codec

from .aggregate import TensorInfo
from .masks import mbyn_mask


def load_eval_data(spec: str | None):
    """'digits' (the built-in test split), a .npz/.csv path, or None."""
    if spec in (None, "", "none"):
        return None
    if spec == "digits":
        return data_mod.digits_split()[1]
    path = Path(spec)
    if path.suffix == ".npz":
        return data_mod.load_npz(spec)
    if path.suffix == ".csv":
        return data_mod.load_csv(spec)
    if path.is_dir():
        return data_mod.load_image_folder(spec)
    raise ValueError(f"--eval-data {spec!r}: use 'digits', a .npz, a .csv, an image folder or 'none'")


class GlobalModel:
    def __init__(self, model, granularity: str, pruning_on: bool):
        self.plain = model
        self.granularity = granularity
        self.pruning_on = pruning_on
        self.layer_report: dict = {"pruned": {}, "dense": {}}
        if pruning_on:
            wrapped, self.layer_report, _ = pruning.wrap(model, granularity)
            self.spec = pruning.weight_spec(wrapped)
        else:  # dense FedAvg: TF-MOT is not even imported
            self.spec = pruning.weight_spec(model)
        kinds = self.layer_report["pruned"]
        self.infos = [TensorInfo(s["name"], kinds.get(s["layer"]) if (s["prunable"] and pruning_on) else None)
                      for s in self.spec]
        self.names = [s["name"] for s in self.spec]
        self.shapes = [tuple(s["shape"]) for s in self.spec]
        self.weights = pruning.get_weights(model)
        self.masks: list[np.ndarray | None] = [np.ones(sh, bool) if i.kind else None
                                               for i, sh in zip(self.infos, self.shapes)]
        if pruning_on and granularity == "2:4":  # the 2:4 pattern is fixed from the start (TF-MOT sets it at step 1)
            self.masks = [mbyn_mask(np.abs(w)) if m is not None else None for w, m in zip(self.weights, self.masks)]
            self.weights = [w * m if m is not None else w for w, m in zip(self.weights, self.masks)]
        self.arch_json = model.to_json()
        models.compile_model(self.plain)

    @classmethod
    def create(cls, model_ref: str, input_shape: tuple | None, num_classes: int | None, granularity: str,
               pruning_on: bool, seed: int) -> "GlobalModel":
        if os.path.exists(model_ref):
            model = models.load_file(model_ref)
        else:
            if input_shape is None or num_classes is None:
                raise ValueError(f"built-in model {model_ref!r} needs an input shape and class count "
                                 "(from --eval-data, or --input-shape/--num-classes)")
            model = models.build(model_ref, input_shape, num_classes, seed)
        return cls(model, granularity, pruning_on)

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(s) for s in self.shapes))

    @property
    def dense_fp32_bytes(self) -> int:
        return 4 * self.num_params

    def encode(self, meta: dict[str, Any]) -> bytes:
        """The global model for the agents: exact fp32 values; bitmap masks when pruning."""
        if self.pruning_on:
            return codec.encode(self.weights, names=self.names, masks=self.masks, kind="model", values="fp32",
                                compression="zstd", meta=meta)
        return codec.encode(self.weights, names=self.names, kind="model", values="fp32", compression="none", meta=meta)

    def load(self, path: Path) -> None:
        """Weights and masks from a saved round (resume)."""
        bundle = codec.decode(path.read_bytes(), reference=self.weights)
        if bundle.names != self.names:
            raise ValueError(f"{path} does not hold this run's model")
        self.weights = bundle.tensors
        if self.pruning_on:
            self.masks = [m if i.kind else None for m, i in zip(bundle.masks, self.infos)]

    def evaluate(self, dataset) -> dict[str, float]:
        if dataset is None:
            return {}
        pruning.set_state(self.plain, self.weights)
        x = dataset.x.reshape((-1, *self.plain.input_shape[1:]))
        loss, acc = self.plain.evaluate(x, dataset.y, batch_size=256, verbose=0)
        return {"accuracy": float(acc), "loss": float(loss)}

    def save(self, run_dir: Path, tag: str) -> None:
        """Atomically write the global model as a bundle (resume point) and, when final, as .keras."""
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{tag}.ept.tmp"
        tmp.write_bytes(self.encode({"tag": tag}))
        os.replace(tmp, run_dir / f"{tag}.ept")
        if tag == "final":
            pruning.set_state(self.plain, self.weights)
            self.plain.save(run_dir / "model.keras")
            (run_dir / "model.json").write_text(json.dumps(json.loads(self.arch_json), indent=1))
