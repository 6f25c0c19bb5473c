"""Built-in models (tf-keras). Small enough for a Pi, big enough to prune.

- ``digits_cnn``: 2 conv + dense head for 8x8x1 images (~284k parameters, most of
  them in the dense layer: the typical over-parameterised edge CNN).
- ``fmnist_cnn``: the CNN of the FL literature (McMahan et al. 2017's "CNN") for 28x28x1
  images such as fashion-mnist: two 5x5 conv + 2x2 max-pool stages (32, 64 filters,
  'same' padding), Dense 512, Dense 10: 1,663,370 parameters (6.7 MB fp32), 97% of them
  in ``fc1``.
- ``fmnist_cnn_wide``: the same with Dense 2048: 6,497,162 parameters (26.0 MB fp32),
  for studies of cost against model size.
- ``mlp``: a 3-layer MLP for tabular/sensor vectors.
- ``mobilenet_tiny``: MobileNetV2-style, 96x96x3, shaped for XNNPACK's sparse kernels.

Models travel as Keras JSON (architecture) plus weights in the tensor codec, so
agents need no copy of this module's code to train a user's model.
"""

from __future__ import annotations

from collections.abc import Callable

from .tfenv import load


def digits_cnn(input_shape=(8, 8, 1), num_classes=10, seed=0):
    keras = load().keras
    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [
            keras.layers.Input(shape=input_shape),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", kernel_initializer=init(seed), name="conv1"),
            keras.layers.Conv2D(
                64, 3, padding="same", activation="relu", kernel_initializer=init(seed + 1), name="conv2"
            ),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(256, activation="relu", kernel_initializer=init(seed + 2), name="fc1"),
            keras.layers.Dense(num_classes, kernel_initializer=init(seed + 3), name="logits"),
        ],
        name="digits_cnn",
    )


def fmnist_cnn(input_shape=(28, 28, 1), num_classes=10, seed=0, hidden=512, name="fmnist_cnn"):
    """Conv 5x5x32 + ReLU, MaxPool 2, Conv 5x5x64 + ReLU, MaxPool 2, Flatten, Dense ``hidden`` + ReLU,
    Dense ``num_classes`` (logits). Layer names as in :func:`digits_cnn` (conv1, conv2, fc1, logits)."""
    keras = load().keras
    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [
            keras.layers.Input(shape=input_shape),
            keras.layers.Conv2D(32, 5, padding="same", activation="relu", kernel_initializer=init(seed), name="conv1"),
            keras.layers.MaxPooling2D(2, name="pool1"),
            keras.layers.Conv2D(
                64, 5, padding="same", activation="relu", kernel_initializer=init(seed + 1), name="conv2"
            ),
            keras.layers.MaxPooling2D(2, name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(hidden, activation="relu", kernel_initializer=init(seed + 2), name="fc1"),
            keras.layers.Dense(num_classes, kernel_initializer=init(seed + 3), name="logits"),
        ],
        name=name,
    )


def fmnist_cnn_wide(input_shape=(28, 28, 1), num_classes=10, seed=0):
    """:func:`fmnist_cnn` with a 2048-unit ``fc1``: about 4x the parameters (6,497,162 at 28x28x1, 10 classes)."""
    return fmnist_cnn(input_shape, num_classes, seed, hidden=2048, name="fmnist_cnn_wide")


def mlp(input_shape=(64,), num_classes=10, seed=0):
    keras = load().keras
    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [
            keras.layers.Input(shape=input_shape),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(256, activation="relu", kernel_initializer=init(seed), name="fc1"),
            keras.layers.Dense(128, activation="relu", kernel_initializer=init(seed + 1), name="fc2"),
            keras.layers.Dense(num_classes, kernel_initializer=init(seed + 2), name="logits"),
        ],
        name="mlp",
    )


def mobilenet_tiny(input_shape=(96, 96, 3), num_classes=10, seed=0, width=32):
    """A MobileNetV2-style model shaped for XNNPACK's sparse inference path.

    XNNPACK runs a subgraph with sparse kernels only if it starts with a 3x3 stride-2
    convolution on 3 input channels (here ZeroPadding2D(1) + 'valid' conv), has its
    1x1 convolutions at >= 2/3 sparsity, and ends in a mean (global average pooling).
    Prune it with the ``xnnpack`` policy (1x1 convolutions only).
    """
    keras = load().keras
    L = keras.layers
    init = keras.initializers.HeNormal
    x = inp = L.Input(shape=input_shape)
    x = L.ZeroPadding2D(1, name="stem_pad")(x)
    x = L.Conv2D(width, 3, strides=2, padding="valid", use_bias=False, kernel_initializer=init(seed), name="stem")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    channels = width
    for i, (expand, out, stride) in enumerate([(4, 32, 1), (4, 48, 2), (4, 48, 1), (4, 64, 2), (4, 64, 1)]):
        shortcut = x
        y = L.Conv2D(
            channels * expand, 1, use_bias=False, kernel_initializer=init(seed + 10 * i + 1), name=f"b{i}_expand"
        )(x)
        y = L.BatchNormalization(name=f"b{i}_expand_bn")(y)
        y = L.ReLU(6.0, name=f"b{i}_expand_relu")(y)
        y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"b{i}_dw")(y)
        y = L.BatchNormalization(name=f"b{i}_dw_bn")(y)
        y = L.ReLU(6.0, name=f"b{i}_dw_relu")(y)
        y = L.Conv2D(out, 1, use_bias=False, kernel_initializer=init(seed + 10 * i + 2), name=f"b{i}_project")(y)
        y = L.BatchNormalization(name=f"b{i}_project_bn")(y)
        x = L.Add(name=f"b{i}_add")([shortcut, y]) if stride == 1 and out == channels else y
        channels = out
    x = L.Conv2D(256, 1, use_bias=False, kernel_initializer=init(seed + 99), name="head")(x)
    x = L.BatchNormalization(name="head_bn")(x)
    x = L.ReLU(6.0, name="head_relu")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    out = L.Dense(num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed), name="logits")(x)
    return keras.Model(inp, out, name="mobilenet_tiny")


BUILTIN: dict[str, Callable] = {
    "digits_cnn": digits_cnn,
    "fmnist_cnn": fmnist_cnn,
    "fmnist_cnn_wide": fmnist_cnn_wide,
    "mlp": mlp,
    "mobilenet_tiny": mobilenet_tiny,
}
DEFAULT_SHAPES = {
    "digits_cnn": ((8, 8, 1), 10),
    "fmnist_cnn": ((28, 28, 1), 10),
    "fmnist_cnn_wide": ((28, 28, 1), 10),
    "mlp": ((64,), 10),
    "mobilenet_tiny": ((96, 96, 3), 10),
}


def build(name: str, input_shape: tuple, num_classes: int, seed: int = 0):
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in model {name!r}; choose from {', '.join(BUILTIN)} or give a model file")
    return BUILTIN[name](tuple(input_shape), num_classes, seed)


def load_file(path: str):
    """A user model saved with tf-keras (.keras, .h5 or a SavedModel directory), compiled as it was
    saved when that loads (its loss and metrics are kept: see :func:`training_config`)."""
    keras = load().keras
    try:
        try:
            return keras.models.load_model(path)
        except (TypeError, ValueError):  # a custom loss or metric we cannot rebuild: the weights still come
            return keras.models.load_model(path, compile=False)
    except (OSError, ValueError, ImportError) as exc:
        raise ValueError(f"cannot load model {path!r} with tf-keras: {exc}") from None


def training_config(model) -> dict | None:
    """The loss and metrics a user's model was compiled with, as names a device can rebuild with
    :func:`compile_model`; None for an uncompiled model (classification defaults apply)."""
    keras = load().keras
    loss = getattr(model, "loss", None)
    if loss is None:
        return None
    loss_name = loss if isinstance(loss, str) else keras.losses.serialize(loss)
    metrics = []
    for m in getattr(model, "compiled_metrics", None) and model.compiled_metrics._user_metrics or []:
        metrics.append(m if isinstance(m, str) else keras.metrics.serialize(m))
    return {"loss": loss_name, "metrics": metrics}


def is_classifier(training: dict | None) -> bool:
    """Accuracy is reported (and labels counted) only for classification losses."""
    if training is None:
        return True
    text = repr(training.get("loss")).lower()
    return "crossentropy" in text or "categorical" in text


def from_json(arch: str):
    keras = load().keras
    return keras.models.model_from_json(arch)


def compile_model(model, lr: float = 1e-3, optimizer: str = "adam", training: dict | None = None):
    """Compile for local training: the model's own loss and metrics when it came with them
    (``training``, from :func:`training_config`), else sparse categorical cross-entropy + accuracy."""
    keras = load().keras
    opt = keras.optimizers.Adam(lr) if optimizer == "adam" else keras.optimizers.SGD(lr, momentum=0.9)
    if training is not None:
        loss = training["loss"]
        model.compile(
            optimizer=opt,
            loss=loss if isinstance(loss, str) else keras.losses.deserialize(loss),
            metrics=[m if isinstance(m, str) else keras.metrics.deserialize(m) for m in training.get("metrics") or []],
        )
        return model
    softmax_out = model.layers[-1].get_config().get("activation") == "softmax"
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax_out),
        metrics=["accuracy"],
    )
    return model
