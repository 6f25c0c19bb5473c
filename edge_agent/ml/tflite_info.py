"""Read a .tflite file's structure without running it: is it TFLite, and how sparse are its weights.

Uses the flatbuffer schema module that ships with LiteRT (``ai_edge_litert``) or
TensorFlow, so both the device and the coordinator can read artifacts. Sparsity is
read from the bytes actually stored, not from any training config:

- a weight tensor stored with TFLite sparsity metadata (``EXPERIMENTAL_SPARSITY``)
  holds only its kept values: sparsity = 1 - nonzero(stored) / size;
- a dense weight tensor: sparsity = share of elements equal to its zero point.

Weight tensors are the filters of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and
TRANSPOSE_CONV, followed back through DENSIFY / DEQUANTIZE to their constant.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TFLITE_IDENTIFIER = b"TFL3"
_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8}
_WEIGHT_OPS = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1, "TRANSPOSE_CONV": 1}
_PASS_THROUGH = ("DENSIFY", "DEQUANTIZE")


class NotTFLite(ValueError):
    """The bytes are not a TFLite flatbuffer."""


def is_tflite(data: bytes) -> bool:
    return len(data) >= 8 and data[4:8] == TFLITE_IDENTIFIER


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from .tfenv import tflite_schema

        schema = tflite_schema()
    return schema


def weight_sparsity(data: bytes) -> dict[str, Any]:
    """Per weight tensor: shape, dtype, stored encoding, sparsity; plus the overall figure."""
    if not is_tflite(data):
        raise NotTFLite("not a TFLite model (no 'TFL3' file identifier at byte 4)")
    schema = _schema()
    try:
        return _analyse(schema, schema.ModelT.InitFromPackedBuf(bytearray(data), 0))
    except Exception as exc:  # truncated or corrupted flatbuffer: fields missing or out of range
        raise NotTFLite(f"TFLite flatbuffer is corrupted: {type(exc).__name__}: {exc}") from None


def _analyse(schema, model) -> dict[str, Any]:
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    tensors_out, zeros_total, size_total = [], 0, 0
    for graph in model.subgraphs:
        producer = {}
        for op in graph.operators:
            for o in op.outputs if op.outputs is not None else []:
                producer[int(o)] = op
        seen = set()
        for op in graph.operators:
            name = op_names.get(codes[op.opcodeIndex], "")
            if name not in _WEIGHT_OPS or op.inputs is None or len(op.inputs) <= _WEIGHT_OPS[name]:
                continue
            idx = int(op.inputs[_WEIGHT_OPS[name]])
            while idx in producer and op_names.get(codes[producer[idx].opcodeIndex], "") in _PASS_THROUGH:
                idx = int(producer[idx].inputs[0])
            if idx in seen:
                continue
            seen.add(idx)
            t = graph.tensors[idx]
            buf = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
            if buf is None or t.type not in _DTYPES:
                continue
            stored = np.frombuffer(bytes(bytearray(buf)), dtype=_DTYPES[t.type])
            shape = [int(d) for d in (t.shape if t.shape is not None else [])]
            size = int(np.prod(shape)) if shape else stored.size
            zero_point = 0
            if t.quantization is not None and t.quantization.zeroPoint is not None and len(t.quantization.zeroPoint):
                zero_point = int(t.quantization.zeroPoint[0])
            nonzero = int(np.count_nonzero(stored != zero_point))
            zeros = size - nonzero
            tensors_out.append(
                {
                    "name": t.name.decode() if isinstance(t.name, bytes) else str(t.name),
                    "op": name,
                    "shape": shape,
                    "dtype": np.dtype(_DTYPES[t.type]).name,
                    "encoding": "sparse" if t.sparsity is not None else "dense",
                    "stored_values": int(stored.size),
                    "size": size,
                    "sparsity": round(zeros / size, 6) if size else 0.0,
                }
            )
            zeros_total += zeros
            size_total += size
    return {
        "tensors": tensors_out,
        "weights": size_total,
        "sparsity": round(zeros_total / size_total, 6) if size_total else 0.0,
    }
