"""The dense half of DLRM as Flax NNX modules: MLPs and feature interactions.

The embedding tables are deliberately not part of these modules: they live in
their own pytree (see `dlrm_jax.embedding`) so that they can be sharded and
updated sparsely. `DLRM.__call__` therefore takes the already looked-up
embedding vectors.

Layer order, activations and initialisation follow the reference
implementation (facebookresearch/dlrm, `dlrm_s_pytorch.py`), so that weights
trained there load here and give the same predictions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlrm_jax.config import ModelSpec
from dlrm_jax.ops import take_static


def reference_kernel_init(key, shape, dtype=jnp.float32):
  """N(0, sqrt(2 / (fan_in + fan_out))), the reference's Linear weight init."""
  fan_in, fan_out = shape
  return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / (fan_in + fan_out)).astype(dtype)


def reference_bias_init(key, shape, dtype=jnp.float32):
  """N(0, sqrt(1 / fan_out)), the reference's Linear bias init."""
  return jax.random.normal(key, shape, dtype) * np.sqrt(1.0 / shape[-1]).astype(dtype)


def abstract_model(spec: ModelSpec) -> "DLRM":
  """`DLRM(spec)` with shapes and dtypes only (for its graph definition and state
  structure), nothing allocated."""
  return nnx.eval_shape(lambda: DLRM(spec, rngs=nnx.Rngs(0)))


def init_params(spec: ModelSpec, seed: int) -> nnx.State:
  """Reference-initialised parameters of `DLRM(spec)`, drawn on the host.

  Same distributions as the module's own initialisers, but drawn with numpy
  (as the reference does): XLA:CPU takes seconds to compile each random
  normal op, far longer than drawing a few MB of weights here.
  """
  _, state = nnx.split(abstract_model(spec))
  rng = np.random.default_rng(seed)
  values = nnx.to_pure_dict(state)
  for mlp in ("bottom", "top"):
    for i in sorted(values[mlp]["layers"]):
      layer = values[mlp]["layers"][i]
      fan_in, fan_out = layer["kernel"].shape
      # Drawn as the reference's [out, in] matrix, stored as Flax's [in, out].
      w = rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), (fan_out, fan_in))
      layer["kernel"] = jnp.asarray(w.T, jnp.float32)
      layer["bias"] = jnp.asarray(rng.normal(0.0, np.sqrt(1.0 / fan_out), fan_out), jnp.float32)
  nnx.replace_by_pure_dict(state, values)
  return state


class MLP(nnx.Module):
  """Stack of Linear layers with ReLU between them (and after the last if asked)."""

  def __init__(self, widths: tuple[int, ...], *, relu_last: bool, rngs: nnx.Rngs):
    self.layers = nnx.List([
        nnx.Linear(
            fan_in, fan_out,
            kernel_init=reference_kernel_init,
            bias_init=reference_bias_init,
            rngs=rngs,
        )
        for fan_in, fan_out in zip(widths[:-1], widths[1:])
    ])
    self.relu_last = relu_last

  def __call__(self, x: jax.Array) -> jax.Array:
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < last or self.relu_last:
        x = jax.nn.relu(x)
    return x


@functools.lru_cache(maxsize=None)
def dot_pair_indices(num_vectors: int, itself: bool) -> np.ndarray:
  """Flat indices into the [n, n] Gram matrix of the pairs the reference keeps.

  Row-major lower triangle: (1,0), (2,0), (2,1), (3,0), ...; with `itself` the
  diagonal is kept too: (0,0), (1,0), (1,1), (2,0), ...
  """
  offset = 1 if itself else 0
  return np.array(
      [i * num_vectors + j for i in range(num_vectors) for j in range(i + offset)],
      dtype=np.int32)


def dot_interaction(x: jax.Array, emb: jax.Array, itself: bool = False) -> jax.Array:
  """[x, pairwise dots of {x, e_1..e_F}]: x [B, D], emb [B, F, D] -> [B, D + P]."""
  t = jnp.concatenate([x[:, None, :], emb], axis=1)  # [B, F+1, D]
  n = t.shape[1]
  gram = jnp.einsum("bid,bjd->bij", t, t).reshape(t.shape[0], n * n)
  pairs = take_static(gram, dot_pair_indices(n, itself), axis=1)
  return jnp.concatenate([x, pairs], axis=1)


def cat_interaction(x: jax.Array, emb: jax.Array) -> jax.Array:
  """[x, e_1, ..., e_F] flattened: x [B, D], emb [B, F, D] -> [B, (F+1) D]."""
  return jnp.concatenate([x, emb.reshape(emb.shape[0], -1)], axis=1)


class DLRM(nnx.Module):
  """Bottom MLP, interaction with the embedding vectors, top MLP; returns logits."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.bottom = MLP(spec.bottom, relu_last=True, rngs=rngs)
    self.top = MLP((spec.interaction_width,) + spec.top, relu_last=False, rngs=rngs)

  def __call__(self, dense: jax.Array, emb: jax.Array) -> jax.Array:
    """dense [B, num_dense], emb [B, F, D] -> click logits [B]."""
    x = self.bottom(dense)
    if self.spec.interaction == "dot":
      z = dot_interaction(x, emb, self.spec.interaction_itself)
    else:
      z = cat_interaction(x, emb)
    return self.top(z)[:, 0]
