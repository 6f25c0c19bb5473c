"""The one place TensorFlow is imported.

TF-MOT only supports Keras 2, so ``TF_USE_LEGACY_KERAS=1`` must be set before
TensorFlow is first imported, and models are built with ``tf_keras``
(tensorflow/model-optimization issue 1119). Every module that needs TensorFlow
calls :func:`load` instead of importing it, which also keeps TensorFlow out of
processes that never train (an idle agent stays small).
"""

from __future__ import annotations

import contextlib
import os
import tempfile


class TFStack:
    """``tf`` and ``keras`` (tf_keras); ``tfmot`` is imported on first use, since dense
    training never needs it and it drags in Keras 3 (about a second per process)."""

    def __init__(self, tf, keras):
        self.tf, self.keras = tf, keras
        self._tfmot = None

    @property
    def tfmot(self):
        if self._tfmot is None:
            import tensorflow_model_optimization as tfmot

            self._tfmot = tfmot
        return self._tfmot


_TF: TFStack | None = None


def load(threads: int = 0) -> TFStack:
    """Import TensorFlow and tf_keras once (TF-MOT lazily, via ``.tfmot``).

    ``threads`` > 0 caps TensorFlow's intra-op pool (set before first use); several
    agents sharing one small machine should each use 1.
    """
    global _TF
    if _TF is not None:
        return _TF
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _quiet_stderr():  # absl prints CUDA-probing chatter on CPU-only hosts before any log level applies
        import tensorflow as tf
        import tf_keras as keras

    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads))
    _TF = TFStack(tf, keras)
    return _TF


@contextlib.contextmanager
def quiet(fds: tuple[int, ...] = (2,)):
    """Hold back what C++ (and Python) write to these file descriptors meanwhile; replay it if the
    block fails. TensorFlow's import and the TFLite converter print pages of chatter (the converter
    even to stdout, which would break --json output)."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        saved = [os.dup(fd) for fd in fds]
    except OSError:
        yield
        return
    with contextlib.ExitStack() as stack:
        bufs = [stack.enter_context(tempfile.TemporaryFile()) for _ in fds]
        for fd, buf in zip(fds, bufs):
            os.dup2(buf.fileno(), fd)
        try:
            yield
        except BaseException:
            for fd, keep, buf in zip(fds, saved, bufs):
                os.dup2(keep, fd)
                buf.seek(0)
                os.write(2, buf.read())
            raise
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, keep in zip(fds, saved):
                os.dup2(keep, fd)
                os.close(keep)


_quiet_stderr = quiet


def tflite_schema():
    """TFLite's flatbuffer schema from TensorFlow (when LiteRT, which ships its own, is absent)."""
    load()
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def tfmot_internals():
    """TF-MOT internals edgeprune relies on (not in its public API): the prune registry and the wrapper class."""
    load()
    from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry, pruning_wrapper

    return prune_registry.PruneRegistry, pruning_wrapper.PruneLowMagnitude


def seed_internals():
    """TensorFlow's eager context module and tf-keras's backend (seeding without clearing kernel caches;
    ImportError where a version moved them)."""
    load()
    from tensorflow.python.eager import context
    from tf_keras.src import backend as keras_backend

    return context, keras_backend


def available() -> bool:
    """True if the training stack is installed (without importing it)."""
    import importlib.util

    return all(
        importlib.util.find_spec(m) is not None for m in ("tensorflow", "tf_keras", "tensorflow_model_optimization")
    )
