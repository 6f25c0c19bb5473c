"""The machine-learning layer: the one TensorFlow import (tfenv), models, pruning, data, TFLite reading."""
