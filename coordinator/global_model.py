"""The global model on the coordinator: architecture, weights, masks, evaluation.

Holds weights in edgeprune's tensor order (see :mod:`edge_agent.ml.pruning`) and
the mask of every pruned tensor as numpy arrays. The compiled tf-keras copy
(evaluation on the held-out set that never leaves the coordinator, the final
``model.keras``) lives in a :class:`~coordinator.model_worker.ModelWorker`
child, so the coordinator itself never imports TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.ml import data as data_mod
from edge_agent.protocol import codec

from . import surgery
from .masks import mbyn_mask
from .model_worker import ModelWorker, ModelWorkerError
from .strategy import TensorInfo

log = logging.getLogger("coordinator.global_model")


def load_eval_data(spec: str | None):
    """'digits' or 'fashion-mnist' (a built-in test split: 360 / 10,000 images), a .npz/.csv path,
    an image folder, or None. ValueError (DataNotInstalled naming the apt command) otherwise."""
    if spec in (None, "", "none"):
        return None
    if spec == "digits":
        return data_mod.digits_split()[1]
    if spec == "fashion-mnist":
        return data_mod.fashion_mnist("test")
    path = Path(spec)
    if path.suffix == ".npz":
        return data_mod.load_npz(spec)
    if path.suffix == ".csv":
        return data_mod.load_csv(spec)
    if path.is_dir():
        return data_mod.load_image_folder(spec)
    raise ValueError(
        f"--eval-data {spec!r}: use {', '.join(repr(d) for d in data_mod.BUILTIN_DATASETS)}, a .npz, "
        "a .csv, an image folder or 'none'"
    )


class GlobalModel:
    """Numpy weights and masks in edgeprune's tensor order; Keras work goes to a :class:`ModelWorker`."""

    worker_class: Any = ModelWorker  # tests of the round loop use model_worker.InProcessModelWorker

    def __init__(self, worker: ModelWorker, granularity: str, pruning_on: bool):
        info = worker.start()
        self.worker = worker
        self.granularity = granularity
        self.pruning_on = pruning_on
        self.layer_report: dict = info["layer_report"]
        self.spec = info["spec"]
        kinds = self.layer_report["pruned"]
        self.infos = [
            TensorInfo(s["name"], kinds.get(s["layer"]) if (s["prunable"] and pruning_on) else None) for s in self.spec
        ]
        self.names = [s["name"] for s in self.spec]
        self.shapes = [tuple(s["shape"]) for s in self.spec]
        self.weights: list[np.ndarray] = info["weights"]
        self.masks: list[np.ndarray | None] = [
            np.ones(sh, bool) if i.kind else None for i, sh in zip(self.infos, self.shapes)
        ]
        if pruning_on and granularity == "2:4":  # the 2:4 pattern is fixed from the start (TF-MOT sets it at step 1)
            self.masks = [mbyn_mask(np.abs(w)) if m is not None else None for w, m in zip(self.weights, self.masks)]
            self.weights = [w * m if m is not None else w for w, m in zip(self.weights, self.masks)]
        self.arch_json: str = info["arch_json"]
        self.flops: int = info["flops"]
        self.training: dict | None = info.get("training")  # a user model's own loss and metrics, or None
        # read once per architecture (a shrink builds a new one): what can shrink and where its units are measured
        self.units: dict[str, int] = surgery.units(surgery.parse(self.arch_json))  # per Dense/Conv2D layer
        self.structure: dict[str, Any] = surgery.report(self.arch_json)
        self.has_eval = False

    @classmethod
    def create(
        cls,
        model_ref: str,
        input_shape: tuple | None,
        num_classes: int | None,
        granularity: str,
        pruning_on: bool,
        seed: int,
        eval_set=None,
        arch_json: str | None = None,
        training: dict | None = None,
    ) -> "GlobalModel":
        """Build the model in a fresh model worker (ValueError when it cannot be built); ``arch_json``
        (a structured run's shrunk architecture) replaces ``model_ref``."""
        worker = cls.worker_class(
            {
                "model_ref": model_ref,
                "arch_json": arch_json,
                "input_shape": input_shape,
                "num_classes": num_classes,
                "granularity": granularity,
                "pruning_on": pruning_on,
                "seed": seed,
                "training": training,
                "eval_x": None if eval_set is None else eval_set.x,
                "eval_y": None if eval_set is None else eval_set.y,
            }
        )
        try:
            gm = cls(worker, granularity, pruning_on)
        except ModelWorkerError as exc:
            worker.close(kill=True)
            raise ValueError(str(exc)) from None
        gm.has_eval = eval_set is not None
        if not gm.has_eval:  # nothing for it to do until the end of the run: give its memory back
            worker.close()
        return gm

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(s) for s in self.shapes))

    @property
    def dense_fp32_bytes(self) -> int:
        return 4 * self.num_params

    def encode(self, meta: dict[str, Any]) -> bytes:
        """The global model for the agents: exact fp32 values; bitmap masks when pruning."""
        if self.pruning_on:
            return codec.encode(
                self.weights,
                names=self.names,
                masks=self.masks,
                kind="model",
                values="fp32",
                compression="zstd",
                meta=meta,
            )
        return codec.encode(self.weights, names=self.names, kind="model", values="fp32", compression="none", meta=meta)

    def load(self, path: Path) -> None:
        """Weights and masks from a saved round (resume)."""
        bundle = codec.decode(path.read_bytes(), reference=self.weights)
        if bundle.names != self.names:
            raise ValueError(f"{path} does not hold this run's model")
        self.weights = bundle.tensors
        if self.pruning_on:
            self.masks = [m if i.kind else None for m, i in zip(bundle.masks, self.infos)]

    def evaluate(self) -> dict[str, float]:
        if not self.has_eval:
            return {}
        try:
            return self.worker.call("evaluate", weights=self.weights)
        except ModelWorkerError as exc:  # a round is not lost for want of its accuracy figure
            log.warning("evaluation failed: %s", exc)
            return {}

    def tensorboard(self, logdir: Path, records: list, background: bool = False) -> None:
        """Write :class:`coordinator.tblog.Record` s under ``logdir`` (in the worker: it has TensorFlow);
        ``background``: return once the worker has them, not once they are written."""
        if records:
            self.worker.call("tensorboard", logdir=str(logdir), records=records, background=background)

    def save(self, run_dir: Path, tag: str) -> None:
        """Atomically write the global model as a bundle (resume point) and, when final, as .keras."""
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{tag}.ept.tmp"
        tmp.write_bytes(self.encode({"tag": tag, "arch": self.arch_json}))  # the weights' architecture, for resume
        os.replace(tmp, run_dir / f"{tag}.ept")
        if tag == "final":
            self.worker.call("save_keras", weights=self.weights, path=str(run_dir / "model.keras"))
            (run_dir / "model.json").write_text(json.dumps(json.loads(self.arch_json), indent=1))

    def shrink(self, keep: dict[str, np.ndarray]) -> None:
        """Remove every unit not in ``keep`` (per layer) and rebuild: the surviving weights and masks
        are copied exactly. SurgeryError (naming the layer) leaves this model as it was."""
        if self.pruning_on and self.granularity in ("2:4", "block"):
            raise surgery.SurgeryError(
                "model",
                f"{self.granularity} sparsity groups input channels; it cannot be " "combined with structured pruning",
            )
        arch, slices = surgery.shrink(self.arch_json, self.names, keep)
        weights = surgery.apply(slices, self.names, self.weights)
        masks = surgery.apply(slices, self.names, self.masks)
        worker = self.worker_class({**self.worker.create_args, "arch_json": arch, "training": self.training})
        try:
            new = GlobalModel(worker, self.granularity, self.pruning_on)
        except ModelWorkerError as exc:
            worker.close(kill=True)
            raise surgery.SurgeryError("model", f"the smaller model does not build: {exc}") from None
        if new.names != self.names or new.shapes != [w.shape for w in weights]:
            worker.close(kill=True)
            raise surgery.SurgeryError("model", "the rebuilt model's tensors do not match the cut weights")
        self.worker.close()
        if not self.has_eval:
            worker.close()
        has_eval = self.has_eval
        self.__dict__.update(new.__dict__)
        self.has_eval = has_eval
        self.weights = weights
        self.masks = [m if i.kind else None for m, i in zip(masks, self.infos)]

    def close(self) -> None:
        self.worker.close()
