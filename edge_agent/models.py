"""Built-in models (tf-keras). Small enough for a Pi, big enough to prune.

- ``digits_cnn``: 2 conv + dense head for 8x8x1 images (~284k parameters, most of
  them in the dense layer: the typical over-parameterised edge CNN).
- ``mlp``: a 3-layer MLP for tabular/sensor vectors.

Models travel as Keras JSON (architecture) plus weights in the tensor codec, so
agents need no copy of this module's code to train a user's model.
"""

from __future__ import annotations

from collections.abc import Callable

from .tfenv import load


def digits_cnn(input_shape=(8, 8, 1), num_classes=10, seed=0):
    keras = load().keras
    init = keras.initializers.GlorotUniform
    return keras.Sequential([
        keras.layers.Input(shape=input_shape),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu", kernel_initializer=init(seed), name="conv1"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu", kernel_initializer=init(seed + 1), name="conv2"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(256, activation="relu", kernel_initializer=init(seed + 2), name="fc1"),
        keras.layers.Dense(num_classes, kernel_initializer=init(seed + 3), name="logits"),
    ], name="digits_cnn")


def mlp(input_shape=(64,), num_classes=10, seed=0):
    keras = load().keras
    init = keras.initializers.GlorotUniform
    return keras.Sequential([
        keras.layers.Input(shape=input_shape),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(256, activation="relu", kernel_initializer=init(seed), name="fc1"),
        keras.layers.Dense(128, activation="relu", kernel_initializer=init(seed + 1), name="fc2"),
        keras.layers.Dense(num_classes, kernel_initializer=init(seed + 2), name="logits"),
    ], name="mlp")


BUILTIN: dict[str, Callable] = {"digits_cnn": digits_cnn, "mlp": mlp}


def build(name: str, input_shape: tuple, num_classes: int, seed: int = 0):
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in model {name!r}; choose from {', '.join(BUILTIN)} or give a model file")
    return BUILTIN[name](tuple(input_shape), num_classes, seed)


def load_file(path: str):
    """A user model saved with tf-keras (.keras, .h5 or a SavedModel directory)."""
    keras = load().keras
    try:
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError, ImportError) as exc:
        raise ValueError(f"cannot load model {path!r} with tf-keras: {exc}") from None


def from_json(arch: str):
    keras = load().keras
    return keras.models.model_from_json(arch)


def compile_model(model, lr: float = 1e-3, optimizer: str = "adam"):
    keras = load().keras
    opt = keras.optimizers.Adam(lr) if optimizer == "adam" else keras.optimizers.SGD(lr, momentum=0.9)
    softmax_out = model.layers[-1].get_config().get("activation") == "softmax"
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax_out),
                  metrics=["accuracy"])
    return model
