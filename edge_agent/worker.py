"""The training worker: a child process that holds TensorFlow for one training run.

The agent starts it on ``train_begin`` and talks to it over a pipe. It imports
TensorFlow once, builds and compiles the (pruning-wrapped) model once, and then
serves rounds until ``end``, until it has been idle for ``idle_s``, or until
its parent goes away. The idle agent therefore never carries TensorFlow's
~650 MB, and rounds never pay its ~5 s start-up again.

Messages are dicts: ``{"op": "begin"|"round"|"end", ...}``; replies are
``{"ok": True, ...}`` or ``{"ok": False, "code": <ErrorCode value>, "message": str}``.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np

from .common.childproc import serve
from .common.procstats import cpu_seconds, peak_rss_bytes, reset_peak_rss
from .protocol import codec
from .protocol.constants import IMPORTANCE_METHODS
from .protocol.errors import EdgepruneError

RAMP_FRACTION = 2 / 3
"""Within a round, masks move from the previous target to the new one over the
first 2/3 of the local steps; the last third fine-tunes under a fixed mask."""
MASK_UPDATES_PER_ROUND = 4
IMPORTANCE_SAMPLES = 512  # local samples the per-unit statistics are computed on
WARM_UP_BATCH = 32  # the coordinator's default local batch size (another size just traces again in round 1)
RANDOM_FREE_LAYERS = frozenset(
    {
        "InputLayer",
        "Dense",
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
        "MaxPooling1D",
        "MaxPooling2D",
        "AveragePooling1D",
        "AveragePooling2D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "Flatten",
        "Reshape",
        "Permute",
        "BatchNormalization",
        "LayerNormalization",
        "Activation",
        "ReLU",
        "LeakyReLU",
        "PReLU",
        "ELU",
        "Softmax",
        "ZeroPadding1D",
        "ZeroPadding2D",
        "Cropping1D",
        "Cropping2D",
        "UpSampling1D",
        "UpSampling2D",
        "Add",
        "Subtract",
        "Multiply",
        "Average",
        "Maximum",
        "Minimum",
        "Concatenate",
        "Embedding",
        "Rescaling",
    }
)
"""tf-keras layers whose training step has no stateful random op (no dropout, noise, augmentation)."""


class WorkerError(EdgepruneError):
    """A training request the worker cannot do; ``code`` travels back to the agent (an ErrorCode value)."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code)


def _regrow_mask_callback(keras, magnitude_mask):
    """A Keras callback that does the regrow round's one mask update outside the train step.

    With ``regrow``, TF-MOT's schedule would prune every unstructured layer once, at train
    step ``k`` (1-based), from the weights after step ``k - 1``: inside the compiled step, where
    TF-MOT sorts the whole tensor (``top_k(k=size)``): ~30 ms for digits_cnn, ~150 ms for a
    1.6M-weight Dense on 1 thread, 10-20% of a pruned round. This callback computes the same
    mask (:func:`edge_agent.ml.pruning.magnitude_mask`, bit for bit) after step ``k - 1``
    (before training when ``k - 1 == 0``) and writes it into the TF-MOT wrapper's mask and
    threshold variables, with that layer's schedule inactive; the wrapper then applies it
    (``weight * mask``) from step ``k`` on, exactly as before. Block and 2:4 layers keep
    TF-MOT's own update (their schedule stays active)."""

    class RegrowMask(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._supports_tf_logs = True  # no per-batch conversion of the logs to numpy
            self.after, self.layers, self.done = 0, [], 0

        @property
        def armed(self) -> bool:
            return bool(self.layers)

        def plan(self, after_steps: int, layers: list) -> None:
            """``layers``: (weight, mask, threshold, sparsity) to prune after ``after_steps`` steps."""
            self.after, self.layers = after_steps, list(layers)

        def _apply(self) -> None:
            for weight, mask, threshold, sparsity in self.layers:
                m, t = magnitude_mask(weight.numpy(), sparsity)
                mask.assign(m.astype(mask.dtype.as_numpy_dtype))
                threshold.assign(t.astype(threshold.dtype.as_numpy_dtype))
            self.layers = []

        def on_train_begin(self, logs=None):
            self.done = 0
            if self.layers and self.after == 0:
                self._apply()

        def on_train_batch_end(self, batch, logs=None):
            self.done += 1
            if self.layers and self.done == self.after:
                self._apply()

    return RegrowMask()


class Run:
    """One training run's state in the worker: data, model, optimizer, schedule."""

    def __init__(self, msg: dict[str, Any], settings: dict[str, Any], preloaded=None):
        from .ml import data, models, pruning
        from .ml.tfenv import load

        self.t = load()
        self.pruning_mod = pruning
        try:
            self.data = preloaded if preloaded is not None else data.load_local(settings)
        except (ValueError, OSError) as exc:
            raise WorkerError("unsupported", f"cannot load training data: {exc}") from None
        try:
            self.model = models.from_json(msg["arch"])
        except (ValueError, TypeError, KeyError) as exc:
            raise WorkerError("bad_args", f"cannot rebuild the model from its architecture: {exc}") from None
        self.use_data(self.data)
        out_units = int(self.model.output_shape[-1])
        self.training = msg.get("training")  # a user model's own loss and metrics (regression, autoencoder)
        self.classifier = models.is_classifier(self.training)
        if self.classifier and self.data.num_classes > out_units:
            raise WorkerError(
                "bad_args", f"local data has {self.data.num_classes} classes, the model outputs {out_units}"
            )
        self.pruned = bool(msg.get("pruning"))
        self.granularity = msg.get("granularity", "unstructured")
        self.schedules: dict[str, Any] = {}
        self.report: dict[str, Any] = {"pruned": {}, "dense": {}}
        if self.pruned:
            try:
                self.model, self.report, self.schedules = pruning.wrap(self.model, self.granularity)
            except ValueError as exc:
                raise WorkerError("bad_args", str(exc)) from None
        models.compile_model(self.model, float(msg.get("lr", 1e-3)), msg.get("optimizer", "adam"), self.training)
        self.spec = pruning.weight_spec(self.model)
        self.names = [s["name"] for s in self.spec]
        self.callbacks = [self.t.tfmot.sparsity.keras.UpdatePruningStep()] if self.pruned else []
        self.triples = pruning.pruning_triples(self.model) if self.pruned else [None] * len(self.spec)
        self.regrow_mask = _regrow_mask_callback(self.t.keras, pruning.magnitude_mask) if self.pruned else None
        self.seed = self._seeder()
        self._build_train_state()

    def use_data(self, ds: Any) -> None:
        """Train on ``ds`` from now on (reshaped to the model's input when only the layout differs);
        the simulator's worker pool switches devices' shards this way."""
        from .ml import data

        in_shape = tuple(self.model.input_shape[1:])
        if tuple(ds.x.shape[1:]) != in_shape:
            if int(np.prod(ds.x.shape[1:])) != int(np.prod(in_shape)):
                raise WorkerError("bad_args", f"local data has shape {ds.x.shape[1:]}, the model expects {in_shape}")
            ds = data.Dataset(ds.x.reshape((-1, *in_shape)), ds.y, ds.name)
        self.data = ds

    def _build_train_state(self) -> None:
        """Create the optimizer's slots and the loss/metric trackers now, eagerly on one sample.

        ``fit`` would create them inside the first trace of its train step, and a
        ``tf.function`` that creates variables is traced a second time: on the first
        round that doubles the tracing (measured ~0.4 s dense, ~0.7 s pruned on 1 thread;
        the wrappers' graph is larger). Every value built here is reset before training
        (optimizer slots each round, metrics at each epoch)."""
        if not len(self.data) or not self._random_free():
            return  # (a model with random ops keeps its two traces: its op seeds come from the second)
        tf, model = self.t.tf, self.model
        try:
            model.optimizer.build(model.trainable_variables)
            x, y = tf.constant(self.data.x[:1]), tf.constant(self.data.y[:1])
            pred = model(x, training=False)
            model.compute_loss(x, y, pred)
            model.compute_metrics(x, y, pred, None)
        except Exception:  # an unusual model: fit builds them as it always did
            pass
        model.reset_metrics()

    def warm_up(self, batch: int = WARM_UP_BATCH) -> float:
        """Trace and instantiate the train step now, in the idle time between the ``begin`` reply
        and the first round (the coordinator is still beginning other devices, evaluating its
        baseline and publishing round 1): on 1 thread that is ~0.5 s (dense) to ~1.2 s
        (TF-MOT wrappers: a larger graph) that round 1 would otherwise spend in its first step.

        One real step on the first batch, with the input pipeline ``fit`` builds for the rounds
        (same batch size, so the same traced signature). Everything it changes is reset by
        :meth:`round` before training (weights, masks, optimizer state, metrics) or restored here
        (TF-MOT's step counters, so step-1 rules such as 2:4 see the step they always saw). Skipped
        for models with a stateful random op in their step (their op seeds are drawn when the step
        is traced, which must stay after the round's seed). Returns the seconds it took."""
        if not len(self.data) or not self._random_free() or getattr(self.model, "train_function", None) is not None:
            return 0.0
        t0 = time.perf_counter()
        counters = [
            (layer.pruning_step, int(layer.pruning_step.numpy()))
            for layer in self.model.layers
            if getattr(layer, "pruning_step", None) is not None
        ]
        try:
            for var, _ in counters:
                var.assign(1)  # the warm-up step is TF-MOT step 2: no step-1 mask rule fires
            self.model.fit(
                self.data.x, self.data.y, epochs=1, batch_size=batch, steps_per_epoch=1, shuffle=False, verbose=0
            )
        except Exception:  # an unusual model: round 1 traces it, as it always did
            pass
        finally:
            for var, value in counters:
                var.assign(value)
        return time.perf_counter() - t0

    def _random_free(self) -> bool:
        """True if no layer of the model can hold a stateful random op in the compiled train step
        (built-in tf-keras layers known to have none; the pruning wrapper counts as its layer)."""

        def ok(layer) -> bool:
            inner = self.pruning_mod._inner(layer)
            if hasattr(inner, "layers") and type(inner).__module__.startswith("tf_keras."):  # a nested model
                return all(ok(sub) for sub in inner.layers)
            return type(inner).__name__ in RANDOM_FREE_LAYERS and type(inner).__module__.startswith("tf_keras.")

        return all(ok(layer) for layer in self.model.layers)

    def _seeder(self):
        """A function that seeds Python, NumPy, TensorFlow and tf-keras like
        ``tf.keras.utils.set_random_seed`` but keeps TensorFlow's kernel caches.

        ``tf.random.set_seed`` clears every cached kernel (``TFE_ContextClearCaches``) so that
        stateful random kernels restart; the compiled train step is then rebuilt at the first
        step of every round: measured 0.4 s (dense) to 1-1.4 s (wrapped) per round on 1 thread,
        half of a small pruned round. The shuffle of ``fit`` draws its op seeds from the global
        seed when ``fit`` traces its input pipeline (fresh every call), so it does not need the
        clear: rounds are bit-identical to the clearing version (checked). A model with a
        stateful random op in its train step (dropout, noise, augmentation, or any layer not
        known to be free of them) would continue its random streams instead of restarting
        them: it keeps the clearing call, as does a TensorFlow without these internals."""
        keras = self.t.keras
        try:
            from .ml.tfenv import seed_internals

            context, keras_backend = seed_internals()
            ctx = context.context()
            usable = hasattr(ctx, "_seed") and hasattr(keras_backend, "_SEED_GENERATOR")
        except ImportError:
            usable = False
        if not usable or not self._random_free():
            return keras.utils.set_random_seed
        if not hasattr(ctx, "_rng"):  # the public path creates the op-seed generator, once, before any tracing
            keras.utils.set_random_seed(0)

        def seed(value: int) -> None:
            random.seed(value)
            np.random.seed(value)
            ctx._seed = value  # what tf.random.set_seed does, minus the kernel-cache clear
            ctx._rng = random.Random(value)
            keras_backend._SEED_GENERATOR.generator = random.Random(value)

        return seed

    def info(self) -> dict[str, Any]:
        from .ml.shards import label_histogram

        return {
            "num_samples": len(self.data),
            "dataset": self.data.name,
            "label_histogram": label_histogram(self.data.y, int(self.model.output_shape[-1]))
            if self.classifier
            else None,
            "layers": self.report,
            "weights": len(self.spec),
        }

    def _pruning_step(self) -> int:
        for layer in self.model.layers:
            step = getattr(layer, "pruning_step", None)
            if step is not None:
                return max(0, int(step.numpy()))
        return 0

    def _plan_pruning(self, steps: int, ref_masks: list, targets: dict[str, float], regrow: float = 0.0) -> None:
        """Per layer: ramp from the mask's current sparsity to its target over the first
        2/3 of the local steps, a few mask updates; layers already there keep their mask.

        With ``regrow`` (a fraction of the local steps), every position trains from the
        start (pruned ones from zero) and the layer is pruned by magnitude at that point:
        weights that grew back can win their place."""
        step0 = self._pruning_step()
        if self.regrow_mask is not None:
            self.regrow_mask.plan(0, [])
        if regrow:
            k = max(1, int(steps * regrow))
            at, numpy_masks = step0 + k, []
            for spec, ref, triple in zip(self.spec, ref_masks, self.triples):
                sched = self.schedules.get(spec["layer"])
                if sched is not None and ref is not None:
                    target = float(targets.get(spec["name"], 1.0 - float(ref.mean())))
                    # unstructured: the same mask, computed outside the train step (see _regrow_mask_callback)
                    by_numpy = triple is not None and self.report["pruned"].get(spec["layer"]) == "unstructured"
                    sched.set(target, target, at, at, 1, active=not by_numpy)
                    if by_numpy:
                        numpy_masks.append((*triple, target))
            if numpy_masks:
                self.regrow_mask.plan(k - 1, numpy_masks)
            return
        ramp = max(1, int(steps * RAMP_FRACTION))
        freq = max(1, ramp // MASK_UPDATES_PER_ROUND)
        updates = min(MASK_UPDATES_PER_ROUND, max(1, ramp // freq))
        begin = step0 + 1
        for spec, ref in zip(self.spec, ref_masks):
            sched = self.schedules.get(spec["layer"])
            if sched is None or ref is None:
                continue
            current = 1.0 - float(ref.mean())
            target = float(targets.get(spec["name"], current))
            sched.set(min(current, target), target, begin, begin + freq * updates, freq, active=target > current + 1e-6)

    def importance(self, req: dict[str, Any]) -> dict[str, Any]:
        """Per-unit importance of the given Dense/Conv2D layers for the global model just loaded, on
        (up to IMPORTANCE_SAMPLES of) this device's data: one number per output unit or filter.

        ``activation``: mean |output| over samples and positions, read where the coordinator says the
        unit's channel is last seen whole (``at``: after its BatchNormalization and activation);
        ``l1``/``l2``: norm of each unit's weights; ``taylor``: |sum over samples of output x
        dLoss/doutput| / samples (first-order estimate of the loss change when the unit is removed).
        Samples are a seeded random subset, so a device whose data is sorted by class is not judged
        on its first classes only."""
        tf = self.t.tf
        method, names = req.get("method", "activation"), list(req.get("layers") or [])
        if method not in IMPORTANCE_METHODS:
            raise WorkerError("bad_args", f"importance method must be one of {', '.join(IMPORTANCE_METHODS)}")
        by_name = {self.pruning_mod._inner(layer).name: layer for layer in self.model.layers}
        at = {n: (req.get("at") or {}).get(n, n) for n in names}
        missing = [n for n in names + list(at.values()) if n not in by_name]
        if missing:
            raise WorkerError("bad_args", f"importance: the model has no layer {missing[0]!r}")
        layers = [by_name[n] for n in names]
        if method in ("l1", "l2"):
            out = {}
            for name, layer in zip(names, layers):
                k = self.pruning_mod._inner(layer).kernel.numpy()
                axes = tuple(range(k.ndim - 1))
                out[name] = np.abs(k).sum(axes) if method == "l1" else np.sqrt((k**2).sum(axes))
        else:
            n = min(len(self.data), IMPORTANCE_SAMPLES)
            pick = np.sort(np.random.default_rng(0).choice(len(self.data), n, replace=False))
            x, y = self.data.x[pick], self.data.y[pick]
            probe = self.t.keras.Model(
                self.model.inputs, [by_name[at[name]].output for name in names] + [self.model.output]
            )
            acc = {name: 0.0 for name in names}
            for i in range(0, n, 128):
                xb, yb = tf.constant(x[i : i + 128]), tf.constant(y[i : i + 128])
                with tf.GradientTape() as tape:
                    *acts, pred = probe(xb, training=False)
                    loss = self.model.loss(yb, pred) * float(len(xb))  # a sum: per-sample scale
                grads = tape.gradient(loss, acts) if method == "taylor" else [None] * len(acts)
                for name, a, g in zip(names, acts, grads):
                    axes = tuple(range(len(a.shape) - 1))
                    v = tf.abs(a) if method == "activation" else a * g
                    acc[name] = acc[name] + tf.reduce_sum(v, axis=axes).numpy() / int(np.prod(a.shape[1:-1]) or 1)
            out = {name: (np.abs(v) if method == "taylor" else v) / n for name, v in acc.items()}
        return {"method": method, "layers": {k: [round(float(x), 7) for x in v] for k, v in out.items()}}

    def round(self, msg: dict[str, Any]) -> dict[str, Any]:
        tf, pruning = self.t.tf, self.pruning_mod
        wall0, cpu0 = time.perf_counter(), cpu_seconds()
        peak_ok = reset_peak_rss()
        try:
            glob = codec.decode(msg["model"])
        except Exception as exc:  # ProtocolError or worse: the agent reports it
            raise WorkerError("integrity", f"global model does not decode: {exc}") from None
        if len(glob.tensors) != len(self.spec):
            raise WorkerError("bad_args", f"global model has {len(glob.tensors)} tensors, expected {len(self.spec)}")
        ref_masks = [m if s["prunable"] else None for m, s in zip(glob.masks, self.spec)]
        regrow = float(msg.get("regrow") or 0.0)
        pruning.set_state(self.model, glob.tensors, None if regrow or not self.pruned else ref_masks)
        importance = self.importance(msg["importance"]) if msg.get("importance") else None
        opt = self.model.optimizer
        for v in opt.variables:
            v.assign(tf.zeros_like(v))
        opt.learning_rate.assign(float(msg.get("lr", 1e-3)))

        epochs, batch = int(msg.get("epochs", 1)), int(msg.get("batch_size", 32))
        steps = epochs * math.ceil(len(self.data) / batch)
        if self.schedules:
            self._plan_pruning(steps, ref_masks, msg.get("targets") or {}, regrow)
        self.seed(int(msg.get("seed", 0)))
        callbacks = self.callbacks + (
            [self.regrow_mask] if self.regrow_mask is not None and self.regrow_mask.armed else []
        )
        hist = self.model.fit(
            self.data.x, self.data.y, epochs=epochs, batch_size=batch, shuffle=True, callbacks=callbacks, verbose=0
        )
        weights = pruning.get_weights(self.model)
        masks: list[np.ndarray | None] = [None] * len(weights)
        if self.pruned:
            for i, m in enumerate(pruning.get_masks(self.model)):
                if m is not None:
                    if not regrow and ref_masks[i] is not None:
                        m = m & ref_masks[i]  # no regrowth outside the global mask
                    weights[i] = weights[i] * m
                    masks[i] = m
        train_s = time.perf_counter() - wall0
        update = codec.encode_update(
            weights,
            names=self.names,
            masks=masks,
            reference=glob.tensors,
            reference_masks=ref_masks,
            values=msg.get("update_format", "int8"),
            pruned=self.pruned,
            meta={"run_id": msg.get("run_id"), "round": msg.get("round")},
            seed=int(msg.get("seed", 0)),
        )
        kept = [m for m in masks if m is not None]
        return {
            "update": update,
            "metrics": {
                "num_samples": len(self.data),
                "train_loss": float(hist.history["loss"][-1]),
                "train_accuracy": float(hist.history["accuracy"][-1]) if "accuracy" in hist.history else None,
                "train_metrics": {k: float(v[-1]) for k, v in hist.history.items() if np.isfinite(v[-1])},
                "steps": steps,
                "train_s": round(train_s, 4),
                "wall_s": round(time.perf_counter() - wall0, 4),
                "cpu_s": round(cpu_seconds() - cpu0, 4),
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_rss_scope": "round" if peak_ok else "process",
                "sparsity": (1.0 - sum(int(m.sum()) for m in kept) / sum(m.size for m in kept)) if kept else 0.0,
                "update_bytes": len(update),
                **({"importance": importance} if importance is not None else {}),
            },
        }


def main(conn, settings: dict[str, Any], idle_s: float, threads: int) -> None:
    """Worker entry point (runs in the spawned child)."""
    t0 = time.perf_counter()
    from .ml.tfenv import load

    load(threads)
    preloaded = None
    try:  # while the coordinator is still getting ready (a load error is reported at begin)
        from .ml.data import load_local

        preloaded = load_local(settings)
    except Exception:
        pass
    startup_s = time.perf_counter() - t0
    run: Run | None = None

    def handle(msg: dict[str, Any]):
        nonlocal run
        op = msg.get("op")
        if op == "begin":
            run = Run(msg, settings, preloaded)
            # warm up after the reply: in the time until the first round arrives
            return {"ok": True, "startup_s": round(startup_s, 3), **run.info()}, run.warm_up
        if op == "round":
            if run is None:
                raise WorkerError("bad_args", "no training run has begun in this worker")
            return {"ok": True, **run.round(msg)}
        raise WorkerError("unknown_command", f"unknown worker op {op!r}")

    serve(conn, handle, idle_s=idle_s)  # idle: the worker exits and gives the memory back
