"""The coordinator's TensorFlow, in a child process.

The round loop needs Keras only to build the initial model, to evaluate the
global model on the held-out set, to write TensorBoard event files and to save the
final ``model.keras``. Importing TensorFlow costs ~560 MB of RSS, more than the
whole of what a 1,000-device round needs, so the coordinator process itself
stays TensorFlow-free (numpy weights, streaming aggregation) and sends those
few jobs here, exactly as an agent sends its training to a worker process.

Messages are dicts ``{"op": ..., ...}``; replies are ``{"ok": True, ...}`` or
``{"ok": False, "message": str}``. Ops: ``create``, ``evaluate``, ``tensorboard``
(:func:`coordinator.tblog.write`; with ``background`` it answers first and writes after, so a
round does not wait for it; the next request waits), ``save_keras``, ``end``. A worker made with no ``create``
arguments holds no model: ``edgeprune bench`` uses one to write its TensorBoard run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent.common.childproc import Child, ChildGone, ChildTimeout, serve
from edge_agent.protocol.errors import EdgepruneError

START_TIMEOUT_S = 300.0  # TensorFlow import + model build
CALL_TIMEOUT_S = 600.0


class ModelWorkerError(EdgepruneError, RuntimeError):
    """The model worker failed or went away; the round loop carries on without its answer where it can."""

    code = "model_worker"


class ModelWorker:
    """A spawned process holding the Keras copy of the global model."""

    def __init__(self, create: dict[str, Any] | None):
        self.create_args = create
        self._child: Child | None = None
        self.info: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        return self._child is not None and self._child.alive

    @property
    def pid(self) -> int | None:
        return self._child.pid if self.alive else None

    def start(self) -> dict[str, Any]:
        """Spawn (if needed) and build the model; returns what ``create`` reported."""
        if self.alive:
            return self.info
        self._child = Child(main, (), "edgeprune-model-worker")
        if self.create_args is None:
            self.info = self._call({"op": "ping"}, START_TIMEOUT_S)  # TensorFlow imported: ready
        else:
            self.info = self._call({"op": "create", **self.create_args}, START_TIMEOUT_S)
        return self.info

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.start()
        return self._call({"op": op, **args}, CALL_TIMEOUT_S)

    def _call(self, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            reply = self._child.request(msg, timeout_s)
        except ChildGone as exc:
            self.close(kill=not exc.before_send)
            if exc.before_send:
                raise ModelWorkerError("the model worker is gone") from None
            code = exc.exitcode
        except ChildTimeout:
            self.close(kill=True)
            code = None  # killed only now: it hung
        else:
            if not reply.pop("ok", False):
                raise ModelWorkerError(reply.get("message", "model worker error"))
            return reply
        raise ModelWorkerError(f"the model worker died or hung during {msg['op']} (exit code {code})")

    def close(self, kill: bool = False) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.close(kill)


class KerasModel:
    """The worker's state and its ops: in the spawned child, or in this process (:class:`InProcessModelWorker`)."""

    def __init__(self) -> None:
        from edge_agent.ml.tfenv import load

        self.t = load()
        self.model: Any = None
        self.eval_xy: tuple | None = None
        self.writers: dict[str, Any] = {}
        self.classifier = True

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        from edge_agent.ml import models, pruning

        op = msg.get("op")
        if op == "ping":
            return {"ok": True}
        if op == "create":
            model = self.model = models.from_json(msg["arch_json"]) if msg.get("arch_json") else _build(msg, models)
            training = msg.get("training") or models.training_config(model)  # a user model's own loss
            wrapped, report = None, {"pruned": {}, "dense": {}}
            if msg["pruning_on"]:
                wrapped, report, _ = pruning.wrap(model, msg["granularity"])
            spec = pruning.weight_spec(wrapped if wrapped is not None else model)
            models.compile_model(model, training=training)
            self.classifier = models.is_classifier(training)
            if msg.get("eval_x") is not None:
                self.eval_xy = (msg["eval_x"].reshape((-1, *model.input_shape[1:])), msg["eval_y"])
            return {
                "ok": True,
                "arch_json": model.to_json(),
                "spec": spec,
                "layer_report": report,
                "weights": pruning.get_weights(model),
                "flops": flops(model),
                "training": training,
            }
        if op == "evaluate":
            if self.eval_xy is None:
                return {"ok": True}
            pruning.set_state(self.model, msg["weights"])
            return {"ok": True, **_evaluate(self.model, *self.eval_xy, classifier=self.classifier)}
        if op == "tensorboard":  # with background: answered first, written while the round loop goes on
            from . import tblog

            def write() -> None:
                tblog.write(self.t.tf, msg["logdir"], msg["records"], self.writers)

            if msg.get("background"):
                return {"ok": True}, write
            write()
            return {"ok": True}
        if op == "save_keras":
            pruning.set_state(self.model, msg["weights"])
            self.model.save(msg["path"])
            return {"ok": True}
        return {"ok": False, "message": f"unknown op {op!r}"}

    @staticmethod
    def on_error(exc: BaseException) -> dict[str, Any]:  # report, keep serving
        why = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        return {"ok": False, "message": why}

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}


def main(conn) -> None:
    """Worker entry point (runs in the spawned child)."""
    k = KerasModel()
    serve(conn, k.handle, on_end=k.close, on_error=k.on_error)


class InProcessModelWorker:
    """:class:`ModelWorker`'s interface with :class:`KerasModel` in this process (TensorFlow imported here).

    For tests of the round loop, which would otherwise spend seconds importing TensorFlow in a child
    for every run; a coordinator never uses it (it must stay TensorFlow-free)."""

    def __init__(self, create: dict[str, Any]):
        self.create_args = create
        self._model: KerasModel | None = None
        self.info: dict[str, Any] | None = None
        self.pid = None

    @property
    def alive(self) -> bool:
        return self._model is not None

    def start(self) -> dict[str, Any]:
        if self._model is None:
            self._model = KerasModel()
            self.info = self._call({"op": "create", **self.create_args})
        assert self.info is not None
        return self.info

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.start()
        return self._call({"op": op, **args})

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self._model is not None
        try:
            reply = self._model.handle(msg)
            if isinstance(reply, tuple):  # (reply, work to do after replying): here, at once
                reply, then = reply
                then()
        except Exception as exc:
            reply = self._model.on_error(exc)
        if not reply.pop("ok", False):
            raise ModelWorkerError(reply.get("message", "model worker error"))
        return reply

    def close(self, kill: bool = False) -> None:
        model, self._model = self._model, None
        if model is not None:
            model.close()


def flops(model) -> int:
    """Multiply-adds x 2 of one inference: Dense, Conv2D and DepthwiseConv2D (the rest is noise;
    shared layers, whose output shape is not one, are left out)."""
    total = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if not hasattr(layer, "kernel") and kind != "DepthwiseConv2D":
            continue
        try:
            out = layer.output_shape
        except (AttributeError, RuntimeError):  # a shared layer with several output shapes: not counted
            continue
        if kind == "Dense":
            total += 2 * int(layer.kernel.shape[0]) * int(layer.kernel.shape[1]) * int(np.prod(out[1:-1]) or 1)
        elif kind == "Conv2D":
            kh, kw, cin, cout = (int(d) for d in layer.kernel.shape)
            total += 2 * int(out[1]) * int(out[2]) * kh * kw * cin * cout
        elif kind == "DepthwiseConv2D":
            kh, kw, cin, mult = (int(d) for d in layer.depthwise_kernel.shape)
            total += 2 * int(out[1]) * int(out[2]) * kh * kw * cin * mult
    return total


def _evaluate(model, x, y, batch: int = 1024, classifier: bool = True) -> dict[str, float]:
    """Mean loss, and accuracy for a classifier or the model's own metrics otherwise, by direct
    forward passes: ``model.evaluate`` costs ~0.1 s of set-up per call, more than the whole pass
    over a small held-out set, every round."""
    fwd = getattr(model, "_edgeprune_forward", None)
    if fwd is None:  # traced once per model: eager execution costs more than the arithmetic here
        from edge_agent.ml.tfenv import load

        tf = load().tf
        fwd = model._edgeprune_forward = tf.function(lambda v: model(v, training=False), reduce_retracing=True)
    loss_fn = model.compiled_loss if not callable(model.loss) else model.loss
    if not classifier:  # a regression or reconstruction model: its loss and its own metrics
        from edge_agent.ml.tfenv import load

        keras = load().keras
        metrics = [
            keras.metrics.get(m) if isinstance(m, str) else m for m in (model.compiled_metrics._user_metrics or [])
        ]
        sums = [0.0] * len(metrics)
        loss_sum = 0.0
        tf = load().tf
        for i in range(0, len(x), batch):
            out, yb = fwd(x[i : i + batch]), tf.constant(y[i : i + batch])
            if yb.shape.rank == out.shape.rank - 1 and out.shape[-1] == 1:  # targets (N,) for outputs (N, 1)
                yb = tf.expand_dims(yb, -1)
            loss_sum += float(loss_fn(yb, out)) * len(out)
            for j, m in enumerate(metrics):
                sums[j] += float(np.mean(m(yb, out))) * len(out)
        names = [getattr(m, "__name__", None) or getattr(m, "name", f"metric{j}") for j, m in enumerate(metrics)]
        return {"loss": loss_sum / len(x), **{n: s / len(x) for n, s in zip(names, sums)}}
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = fwd(x[i : i + batch])
        loss_sum += float(loss_fn(y[i : i + batch], out)) * len(out)
        correct += int(np.sum(np.argmax(out, axis=-1) == y[i : i + batch]))
    return {"accuracy": correct / len(x), "loss": loss_sum / len(x)}


def _build(msg: dict[str, Any], models):
    import os

    if os.path.exists(msg["model_ref"]):
        return models.load_file(msg["model_ref"])
    if msg["input_shape"] is None or msg["num_classes"] is None:
        raise ValueError(
            f"built-in model {msg['model_ref']!r} needs an input shape and class count "
            "(from --eval-data, or --input-shape/--num-classes)"
        )
    return models.build(msg["model_ref"], tuple(msg["input_shape"]), msg["num_classes"], msg["seed"])
