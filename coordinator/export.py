"""Turn a trained model into the TFLite artifacts that ship, and record what they really are.

Variants:

- ``dense``: fp32, no optimisation (the baseline).
- ``sparse``: fp32 with ``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``: pruned weights
  are stored in TFLite's sparse format (values + index metadata).
- ``sparse-int8``: sparsity plus full-integer post-training quantisation calibrated
  on a representative dataset (float input/output kept for drop-in use).
- ``fp16``: weights stored as float16.
- ``sparse-int8-qat`` (with ``--qat``): pruning-preserving quantisation-aware
  fine-tuning (TF-MOT ``Default8BitPrunePreserveQuantizeScheme``), then as above.

Every artifact is recorded with its sha256, raw and gzip size, the weight
sparsity read back from the .tflite bytes (:mod:`edge_agent.ml.tflite_info`) and,
given labelled eval data, its own accuracy: each .tflite file run by the TFLite
interpreter on that data (what quantisation costs shows here, not in training).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.ml import tfenv, tflite_info

FORMATS = ("dense", "sparse", "sparse-int8", "fp16")
CALIBRATION_SAMPLES = 200
EVAL_SAMPLES = 10_000  # at most this many examples of the eval data per artifact (fashion-mnist's test split)


def latency_model(name: str, sparsity: float, policy: str = "all", granularity: str = "unstructured", seed: int = 0):
    """A built-in model with untrained weights, magnitude-pruned with TF-MOT to ``sparsity``.

    For latency and size studies only (accuracy is meaningless): it answers "does this
    runtime on this device run the sparse variant faster?" without any training data.
    The achieved sparsity is read back from the weights; a policy that prunes nothing fails loudly.
    """
    from edge_agent.ml import models, pruning, tfenv

    shape, classes = models.DEFAULT_SHAPES[name]
    model = models.build(name, shape, classes, seed)
    if sparsity <= 0:
        return model
    t = tfenv.load()
    schedule = lambda: t.tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=1)  # noqa: E731
    wrapped, report, _ = pruning.wrap(model, granularity, schedule, policy)
    models.compile_model(wrapped)
    rng = np.random.default_rng(seed)
    x = rng.random((64, *shape), dtype=np.float32)
    wrapped.fit(
        x,
        rng.integers(0, classes, 64),
        batch_size=32,
        epochs=1,
        verbose=0,
        callbacks=[t.tfmot.sparsity.keras.UpdatePruningStep()],
    )
    stripped = t.tfmot.sparsity.keras.strip_pruning(wrapped)
    pruned = [w for layer in stripped.layers if layer.name in report["pruned"] for w in layer.get_weights()[:1]]
    achieved = 1.0 - sum(int(np.count_nonzero(w)) for w in pruned) / max(1, sum(w.size for w in pruned))
    if achieved < sparsity - 0.01:
        raise ValueError(f"pruning left the weights at {achieved:.1%} sparsity, not {sparsity:.0%}")
    return stripped


def resolve_model(store, ref: str, prune: float = 0.0, policy: str = "all", granularity: str = "unstructured"):
    """(tf-keras model, run dict or None) for a run id (prefix), a model file, or a built-in name."""
    from edge_agent.ml import models

    run = store.run(ref)
    if run is not None:
        path = Path((run["summary"] or {}).get("run_dir", "")) / "model.keras"
        if not path.exists():
            raise ValueError(f"run {run['run_id']} has no saved model at {path} (did it finish a round?)")
        return models.load_file(str(path)), run
    if os.path.exists(ref):
        return models.load_file(ref), None
    if ref in models.BUILTIN:
        return latency_model(ref, prune, policy, granularity), None
    from .store import RunNotFound

    try:
        store.resolve_run(ref)
    except RunNotFound as exc:
        if "matches" in str(exc):  # an ambiguous run id: name the candidates
            raise ValueError(str(exc)) from None
    raise ValueError(
        f"{ref!r} is neither a run id (see `edgeprune runs`), a model file "
        f"(no such file), nor a built-in model ({', '.join(models.BUILTIN)})"
    )


def _converter(model, fmt: str, calibration: np.ndarray | None):
    tf = tfenv.load().tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if fmt == "dense":
        return conv
    if fmt == "sparse":
        conv.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    elif fmt.startswith("sparse-int8"):
        if calibration is None:
            raise ValueError("sparse-int8 needs calibration data (--calibration-data)")
        conv.optimizations = [tf.lite.Optimize.DEFAULT, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]

        def representative():
            for x in calibration[:CALIBRATION_SAMPLES]:
                yield [x[None, ...].astype(np.float32)]

        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif fmt == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return conv


def qat_model(model, x: np.ndarray, y: np.ndarray, epochs: int = 2, lr: float = 1e-4):
    """Pruning-preserving quantisation-aware fine-tuning (keeps the zeros where they are)."""
    from edge_agent.ml import tfenv

    t = tfenv.load()
    tfmot = t.tfmot
    annotated = tfmot.quantization.keras.quantize_annotate_model(model)
    qat = tfmot.quantization.keras.quantize_apply(
        annotated, tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    )
    softmax_out = model.layers[-1].get_config().get("activation") == "softmax"
    qat.compile(
        optimizer=t.keras.optimizers.Adam(lr),
        loss=t.keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax_out),
        metrics=["accuracy"],
    )
    qat.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return qat


def record(data: bytes, name: str, fmt: str, path: Path) -> dict[str, Any]:
    info = tflite_info.weight_sparsity(data)
    return {
        "name": name,
        "format": fmt,
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "gzip_bytes": len(gzip.compress(data, 9)),
        "sparsity": info["sparsity"],
        "weights": info["weights"],
        "tensors": info["tensors"],
    }


def export(
    model,
    formats: list[str],
    out_dir: Path,
    calibration=None,
    qat_data=None,
    prefix: str = "model",
    progress=lambda msg: None,
    eval_data=None,
) -> list[dict[str, Any]]:
    """Convert ``model`` to each format, write ``out_dir/<prefix>-<format>.tflite``, return records
    (with each artifact's accuracy on ``eval_data`` when it is labelled data of the model's input shape)."""
    from edge_agent.ml import tfenv

    tfenv.load()
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = tuple(model.input_shape[1:])
    if calibration is not None and int(np.prod(calibration.x.shape[1:])) == int(np.prod(shape)):
        calib = calibration.x.reshape((-1, *shape))
    else:  # no matching data (e.g. a built-in model for latency studies): calibrate on uniform noise
        progress(f"no calibration data of shape {shape}: int8 ranges calibrated on uniform random inputs")
        calib = np.random.default_rng(0).random((CALIBRATION_SAMPLES, *shape), dtype=np.float32)
    jobs = [(fmt, model) for fmt in formats]
    if qat_data is not None:
        progress("quantisation-aware fine-tuning (pruning preserved)")
        x = qat_data.x.reshape((-1, *model.input_shape[1:]))
        jobs.append(("sparse-int8-qat", qat_model(model, x, qat_data.y)))
    records = []
    for fmt, m in jobs:
        progress(f"converting {fmt}")
        t0 = time.perf_counter()
        with tfenv.quiet((1, 2)):  # the converter's MLIR/absl chatter, some of it on stdout
            data = _converter(m, fmt, calib).convert()
        path = out_dir / f"{prefix}-{fmt}.tflite"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        rec = record(data, f"{prefix}-{fmt}", fmt, path)
        rec["convert_s"] = round(time.perf_counter() - t0, 3)
        rec.update(artifact_accuracy(data, eval_data, shape))
        records.append(rec)
    (out_dir / "artifacts.json").write_text(json.dumps(records, indent=1))
    return records


def artifact_accuracy(data: bytes, eval_data, shape: tuple) -> dict[str, Any]:
    """``accuracy`` of a .tflite classifier on labelled data, run example by example in the TFLite
    interpreter, and ``accuracy_on`` (the data's name and size); ``accuracy`` None with the reason
    in ``accuracy_on`` when there is nothing to measure it on."""
    if eval_data is None:
        return {"accuracy": None, "accuracy_on": "no eval data (a model without a training run)"}
    if int(np.prod(eval_data.x.shape[1:])) != int(np.prod(shape)) or not eval_data.num_classes:
        return {"accuracy": None, "accuracy_on": f"{eval_data.name}: not labelled data of input shape {shape}"}
    tf = tfenv.load().tf
    interp = tf.lite.Interpreter(model_content=data)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    x = eval_data.x[:EVAL_SAMPLES].reshape((-1, *shape)).astype(np.float32)
    y = eval_data.y[: len(x)]
    if inp["dtype"] != np.float32:  # a full-integer model with integer input: quantise as the converter says
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale + zero), np.iinfo(inp["dtype"]).min, np.iinfo(inp["dtype"]).max)
    if out["shape"][-1] < 2:
        return {"accuracy": None, "accuracy_on": f"{eval_data.name}: the model is not a classifier"}
    correct = 0
    for xi, yi in zip(x, y):
        interp.set_tensor(inp["index"], xi[None, ...].astype(inp["dtype"]))
        interp.invoke()
        correct += int(np.argmax(interp.get_tensor(out["index"])[0]) == yi)
    return {"accuracy": correct / len(x), "accuracy_on": f"{eval_data.name} ({len(x):,} examples)"}
