"""The one place TensorFlow is imported.

TF-MOT only supports Keras 2, so ``TF_USE_LEGACY_KERAS=1`` must be set before
TensorFlow is first imported, and models are built with ``tf_keras``
(tensorflow/model-optimization issue 1119). Every module that needs TensorFlow
calls :func:`load` instead of importing it, which also keeps TensorFlow out of
processes that never train (an idle agent stays small).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

_TF: SimpleNamespace | None = None


def load(threads: int = 0) -> SimpleNamespace:
    """Import TensorFlow, tf_keras and TF-MOT once; return them as ``tf``, ``keras``, ``tfmot``.

    ``threads`` > 0 caps TensorFlow's intra-op pool (set before first use); several
    agents sharing one small machine should each use 1.
    """
    global _TF
    if _TF is not None:
        return _TF
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF's C++ start-up chatter (CUDA probing on CPU hosts)
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads))
    _TF = SimpleNamespace(tf=tf, keras=keras, tfmot=tfmot)
    return _TF


def available() -> bool:
    """True if the training stack is installed (without importing it)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tf_keras", "tensorflow_model_optimization"))
