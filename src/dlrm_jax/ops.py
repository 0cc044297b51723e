"""Array operations the model and the embedding exchange share."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def take_static(x: jax.Array, index, axis: int) -> jax.Array:
  """`jnp.take(x, index, axis)` for a static index without repeats, with a gather as gradient.

  JAX differentiates a gather into a scatter-add into zeros, which XLA:CPU
  runs slowly (a memset of the whole input plus a serial scatter); when no
  position is taken twice, the gradient is itself a gather: every input
  position takes its output position's cotangent, or zero if it was not
  taken. An identity index returns `x` unchanged.
  """
  index = np.asarray(index, np.int32).reshape(-1)
  size = x.shape[axis]
  if index.size == size and np.array_equal(index, np.arange(size)):
    return x
  if np.unique(index).size != index.size or index.min(initial=0) < 0 or (
      index.max(initial=-1) >= size):
    raise ValueError(f"take_static needs distinct indices in [0, {size}), got {index.tolist()}")
  return _take(x, tuple(index.tolist()), axis % x.ndim, size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _take(x, index, axis, size):
  del size  # the input's length along `axis`, for the gradient
  return jnp.take(x, np.asarray(index, np.int32), axis=axis)


def _take_fwd(x, index, axis, size):
  return _take(x, index, axis, size), None


def _take_bwd(index, axis, size, _, g):
  source = np.full(size, len(index), np.int32)  # untaken positions read the zero slot
  source[np.asarray(index)] = np.arange(len(index), dtype=np.int32)
  zero = jnp.zeros(g.shape[:axis] + (1,) + g.shape[axis + 1:], g.dtype)
  return (jnp.take(jnp.concatenate([g, zero], axis=axis), source, axis=axis),)


_take.defvjp(_take_fwd, _take_bwd)
