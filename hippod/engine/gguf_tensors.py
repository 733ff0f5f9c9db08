"""GGUF tensors -> MLX arrays, keeping quantized weights quantized.

llama.cpp's block formats split into two kinds. Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K store, for
every run of 32 values, one scale and one offset and n-bit integers: exactly MLX's affine
quantization with group size 32, so their integers are repacked as they are (lossless but for
rounding the scale to float16). The others (Q2_K, Q3_K, Q6_K with 16-value sub-blocks, IQ4_*)
are dequantized with the `gguf` package and requantized with MLX at the nearest bit width that
loses nothing visible; either way a quantized file stays about its size on disk.
"""

from __future__ import annotations

import numpy as np
import mlx.core as mx
from gguf import GGMLQuantizationType as QT
from gguf import quants

GROUP_SIZE = 32

# Block types that are affine over groups of 32: MLX bits.
EXACT_BITS = {QT.Q4_0: 4, QT.Q4_1: 4, QT.Q5_0: 5, QT.Q5_1: 5, QT.Q8_0: 8, QT.Q4_K: 4, QT.Q5_K: 5}
# Block types requantized by MLX: MLX bits.
REQUANT_BITS = {QT.Q2_K: 4, QT.Q3_K: 4, QT.Q6_K: 6, QT.IQ4_NL: 4, QT.IQ4_XS: 4}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16, QT.F64)

SUPPORTED_TYPES = tuple(t.name for t in (*FLOAT_TYPES, *EXACT_BITS, *REQUANT_BITS))


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def group_scale_bias(qtype: QT, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per 32-value group of an affine block type: (scale, bias) with value = scale*q + bias."""
    if qtype in (QT.Q4_0, QT.Q5_0, QT.Q8_0):
        d = _f16(blocks, 0)
        offset = {QT.Q4_0: 8, QT.Q5_0: 16, QT.Q8_0: 128}[qtype]  # signed q -> unsigned q
        return d, -offset * d
    if qtype in (QT.Q4_1, QT.Q5_1):
        return _f16(blocks, 0), _f16(blocks, 2)
    if qtype in (QT.Q4_K, QT.Q5_K):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, m = quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
        return d * sc.astype(np.float32), -dmin * m.astype(np.float32)
    raise ValueError(f"{qtype.name} is not an affine group-32 type")


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers (rows, cols) in [0, 2^bits) -> MLX's packing: a little-endian bit stream, uint32."""
    rows, cols = q.shape
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8).view("<u4")
    if bits == 4:
        pairs = q.reshape(rows, cols // 2, 2).astype(np.uint8)
        return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4)).view("<u4")
    stream = ((q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    packed = np.packbits(stream.reshape(rows, cols * bits // 8, 8), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed.reshape(rows, -1)).view("<u4")


def _exact(qtype: QT, data: np.ndarray, shape: tuple[int, int]) -> dict[str, mx.array]:
    rows, cols = shape
    bits = EXACT_BITS[qtype]
    _, type_size = quants.GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).reshape(-1, type_size)
    scale, bias = (a.reshape(rows, cols // GROUP_SIZE) for a in group_scale_bias(qtype, blocks))
    scale16, bias16 = scale.astype(np.float16), bias.astype(np.float16)
    values = quants.dequantize(data, qtype).reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    q = np.rint((values - bias[..., None]) / safe)
    q = np.clip(np.where(scale[..., None] == 0, 0, q), 0, 2**bits - 1).astype(np.uint8)
    return {"weight": mx.array(pack_bits(q.reshape(rows, cols), bits)),
            "scales": mx.array(scale16), "biases": mx.array(bias16)}


def convert_tensor(qtype: QT, data: np.ndarray, shape: tuple[int, ...], *, quantizable: bool
                   ) -> tuple[dict[str, mx.array], int | None]:
    """One GGUF tensor -> ({"weight"[, "scales", "biases"]}, MLX bits or None if float).

    `shape` is in numpy order (rows = output features). Only 2-D weights of linear and embedding
    layers (`quantizable`) stay quantized; anything else is dequantized to float16.
    """
    if qtype in FLOAT_TYPES:
        if qtype == QT.F32:
            return {"weight": mx.array(np.asarray(data, dtype=np.float32).reshape(shape))}, None
        if qtype == QT.F16:
            return {"weight": mx.array(np.asarray(data).view(np.float16).reshape(shape))}, None
        values = quants.dequantize(np.asarray(data), qtype).reshape(shape)
        dtype = mx.bfloat16 if qtype == QT.BF16 else mx.float32
        return {"weight": mx.array(values).astype(dtype)}, None
    values_ok = len(shape) == 2 and shape[1] % GROUP_SIZE == 0
    if quantizable and values_ok and qtype in EXACT_BITS:
        return _exact(qtype, data, shape), EXACT_BITS[qtype]
    values = mx.array(quants.dequantize(np.asarray(data), qtype).reshape(shape)).astype(mx.float16)
    if quantizable and values_ok and qtype in REQUANT_BITS:
        bits = REQUANT_BITS[qtype]
        w, scales, biases = mx.quantize(values, group_size=GROUP_SIZE, bits=bits)
        return {"weight": w, "scales": scales, "biases": biases}, bits
    return {"weight": values}, None
