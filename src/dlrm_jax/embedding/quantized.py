"""Row-wise quantised tables for inference: int8 or int4 values, a scale and a bias per row.

The formats of FBGEMM's fused row-wise tables: each row r of a float table is
stored as unsigned integers q (8 or 4 bits; two 4-bit values per byte, the even
column in the low nibble) with `x ~ q * scale[r] + bias[r]`, bias the row's
minimum and scale its range over 255 (int8) or 15 (int4). The scale and bias are
float32 for int8 and float16 for int4, so a row of D values takes

    int8: D + 8 bytes        int4: ceil(D / 2) + 4 bytes        (float32: 4 D)

that is 2.7x smaller than float32 at D=16 and 3.8x at D=128 for int8, 5.3x and
7.5x for int4. A table of odd width (mixed-dimension tables often have one) takes
a last, unused nibble of code 0 per row in int4. A quantised table set is a dict
`{"int8" or "int4": q [rows, D or ceil(D / 2)] uint8, "scale": [rows], "bias":
[rows]}` over the stacked rows; `dlrm_jax.embedding.collection.gather_table`
dequantises the rows a lookup touches (only those) to float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = {"int8": (8, np.float32), "int4": (4, np.float16)}  # bits, scale and bias type


def row_bytes(fmt: str, dim: int) -> int:
  """Bytes of one quantised row of `dim` values, its scale and bias included."""
  bits, scale_dtype = FORMATS[fmt]
  return -(-dim * bits // 8) + 2 * np.dtype(scale_dtype).itemsize


def quantize(table: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
  """A float table [rows, D] in the row-wise format `fmt`."""
  if fmt not in FORMATS:
    raise ValueError(f"quantize={fmt!r} is not one of {tuple(FORMATS)}")
  bits, scale_dtype = FORMATS[fmt]
  x = np.asarray(table, np.float32)
  levels = (1 << bits) - 1
  low, high = x.min(axis=1), x.max(axis=1)
  scale = ((high - low) / levels).astype(scale_dtype)
  scale = np.where(scale > 0, scale, np.ones_like(scale))  # constant rows: any scale
  bias = low.astype(scale_dtype)
  # Quantised against the scale and bias as stored, so that dequantising is exact to them.
  q = np.rint((x - bias[:, None].astype(np.float32)) / scale[:, None].astype(np.float32))
  q = np.clip(q, 0, levels).astype(np.uint8)
  if bits == 4:
    q = np.pad(q, [(0, 0), (0, q.shape[1] % 2)])  # odd widths: a last nibble of 0
    q = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
  return {fmt: q, "scale": scale, "bias": bias}


def format_of(tables: dict) -> str | None:
  """"int8" or "int4" for a quantised table set, None for a float one."""
  return next((f for f in FORMATS if f in tables), None)


def dequantize_rows(tables: dict, rows: jax.Array, dim: int) -> jax.Array:
  """Rows [...] of a quantised table set of width `dim` -> float32 [..., dim] (rows past
  the end clip)."""
  fmt = format_of(tables)
  q = jnp.take(tables[fmt], rows, axis=0, mode="clip")
  if fmt == "int4":
    q = jnp.stack([q & 15, q >> 4], axis=-1).reshape(*q.shape[:-1], 2 * q.shape[-1])
    q = q[..., :dim]
  scale = jnp.take(tables["scale"], rows, axis=0, mode="clip").astype(jnp.float32)
  bias = jnp.take(tables["bias"], rows, axis=0, mode="clip").astype(jnp.float32)
  return q.astype(jnp.float32) * scale[..., None] + bias[..., None]


def dequantize(tables: dict, dim: int) -> np.ndarray:
  """The whole float32 table [rows, dim] a quantised set stands for."""
  rows = np.arange(len(tables["scale"]))
  return np.asarray(dequantize_rows({k: jnp.asarray(v) for k, v in tables.items()}, rows, dim))
