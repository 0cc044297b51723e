"""The model's formulas against a numpy re-derivation, shapes and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlrm_jax.config import ConfigError, base_config
from dlrm_jax.model import (ModelSpec, abstract_model, cat_interaction, dot_interaction,
                            dot_pair_indices, init_params)
from dlrm_jax.ops import take_static


def _np_dot_interaction(x, emb, itself):
  t = np.concatenate([x[:, None, :], emb], axis=1).astype(np.float64)
  n = t.shape[1]
  out = []
  for b in range(t.shape[0]):
    pairs = [t[b, i] @ t[b, j] for i in range(n) for j in range(i + (1 if itself else 0))]
    out.append(np.concatenate([x[b], pairs]))
  return np.array(out)


@pytest.mark.parametrize("itself", [False, True])
def test_dot_interaction_matches_numpy(itself):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 4)).astype(np.float32)
  emb = rng.normal(size=(5, 3, 4)).astype(np.float32)
  got = np.asarray(dot_interaction(jnp.asarray(x), jnp.asarray(emb), itself))
  np.testing.assert_allclose(got, _np_dot_interaction(x, emb, itself), rtol=1e-5, atol=1e-5)
  n = 4
  assert got.shape == (5, 4 + (n * (n + 1) // 2 if itself else n * (n - 1) // 2))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_take_static_value_and_gradient_equal_jnp_take(axis):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(6, 7, 5)), jnp.float32)
  index = [4, 0, 3]  # a subset in another order: untaken positions get zero gradient
  w = jnp.asarray(rng.normal(size=jnp.take(x, jnp.asarray(index), axis=axis).shape), jnp.float32)
  want = jax.value_and_grad(lambda x: (jnp.take(x, jnp.asarray(index), axis=axis) * w).sum())(x)
  got = jax.jit(jax.value_and_grad(lambda x: (take_static(x, index, axis) * w).sum()))(x)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)  # summation order (jit vs eager)
  np.testing.assert_array_equal(got[1], want[1])
  assert take_static(x, range(x.shape[axis]), axis) is x
  with pytest.raises(ValueError, match="distinct"):
    take_static(x, [1, 1], axis)


def test_dot_interaction_pair_order():
  # T = [x, e1, e2] with basis-like vectors so that each dot product is identifiable.
  x = jnp.array([[1.0, 0.0, 0.0]])
  emb = jnp.array([[[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
  got = np.asarray(dot_interaction(x, emb))
  # (1,0) = 2, (2,0) = 3, (2,1) = 6, after x itself.
  np.testing.assert_allclose(got, [[1.0, 0.0, 0.0, 2.0, 3.0, 6.0]])
  got = np.asarray(dot_interaction(x, emb, itself=True))
  # (0,0), (1,0), (1,1), (2,0), (2,1), (2,2).
  np.testing.assert_allclose(got, [[1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 3.0, 6.0, 9.0]])


def test_cat_interaction():
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  emb = np.arange(12, dtype=np.float32).reshape(2, 2, 3) + 100
  got = np.asarray(cat_interaction(jnp.asarray(x), jnp.asarray(emb)))
  np.testing.assert_array_equal(got, np.concatenate([x, emb.reshape(2, 6)], axis=1))


def test_upper_pair_order_is_torchrec_triu_order():
  # TorchRec's DLRM: torch.triu_indices(n, n, offset=1), row-major i < j.
  n = 5
  rows, cols = np.triu_indices(n, k=1)
  np.testing.assert_array_equal(dot_pair_indices(n, False, "upper"), rows * n + cols)
  rows, cols = np.triu_indices(n, k=0)
  np.testing.assert_array_equal(dot_pair_indices(n, True, "upper"), rows * n + cols)
  # The same pairs as the reference's lower triangle (the Gram matrix is symmetric).
  lower = dot_pair_indices(n, False, "lower")
  assert sorted((i % n) * n + i // n for i in lower) == sorted(rows[rows != cols] * n
                                                                + cols[rows != cols])


def _np_cross(values, x0):
  """x_{l+1} = x0 * (W (V x_l) + b) + x_l in float64, from our [in, out] kernels."""
  x = x0
  for i in sorted(values["layers"]):
    layer = values["layers"][i]
    v = np.asarray(layer["v"]["kernel"], np.float64)
    w = np.asarray(layer["w"]["kernel"], np.float64)
    x = x0 * (x @ v @ w + np.asarray(layer["w"]["bias"], np.float64)) + x
  return x


def _np_forward(params, spec, dense, emb):
  values = nnx.to_pure_dict(params)

  def mlp(layers, h, relu_last):
    keys = sorted(layers)
    for i in keys:
      h = h @ np.asarray(layers[i]["kernel"], np.float64) + np.asarray(layers[i]["bias"])
      if i != keys[-1] or relu_last:
        h = np.maximum(h, 0.0)
    return h

  x = mlp(values["bottom"]["layers"], dense.astype(np.float64), True)
  if spec.interaction == "dot":
    z = _np_dot_interaction(x, emb, spec.interaction_itself)
  else:
    z = np.concatenate([x, emb.reshape(emb.shape[0], -1)], axis=1)
  if spec.interaction == "dcn":
    z = _np_cross(values["interaction"], z)
  return mlp(values["top"]["layers"], z, False)[:, 0]


@pytest.mark.parametrize("op,itself", [("dot", False), ("dot", True), ("cat", False),
                                       ("dcn", False)])
def test_forward_matches_numpy(op, itself):
  spec = ModelSpec(num_dense=13, embedding_dim=8, bottom=(13, 16, 8), top=(12, 6, 1),
                   table_rows=(10, 20, 30), interaction=op, interaction_itself=itself,
                   dcn_num_layers=2, dcn_low_rank_dim=5)
  params = init_params(spec, seed=3)
  if op == "dcn":  # non-zero biases, so that the test sees where they go
    values = nnx.to_pure_dict(params)
    for layer in values["interaction"]["layers"].values():
      layer["w"]["bias"] = jnp.linspace(-0.5, 0.5, layer["w"]["bias"].shape[0])
    nnx.replace_by_pure_dict(params, values)
  rng = np.random.default_rng(1)
  dense = rng.random((7, 13)).astype(np.float32)
  emb = rng.normal(size=(7, 3, 8)).astype(np.float32)
  logits = nnx.merge(nnx.graphdef(abstract_model(spec)), params)(
      jnp.asarray(dense), jnp.asarray(emb))
  assert logits.shape == (7,) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), _np_forward(params, spec, dense, emb),
                             rtol=1e-4, atol=1e-5)


def test_parameter_shapes_and_reference_init_statistics():
  spec = ModelSpec(num_dense=13, embedding_dim=16, bottom=(13, 512, 256, 64, 16),
                   top=(512, 256, 1), table_rows=(100,) * 26)
  values = nnx.to_pure_dict(init_params(spec, seed=0))
  bottom = values["bottom"]["layers"]
  assert [bottom[i]["kernel"].shape for i in sorted(bottom)] == [
      (13, 512), (512, 256), (256, 64), (64, 16)]
  top = values["top"]["layers"]
  # The top MLP's input width is derived: D + 27 * 26 / 2 = 367, as in the reference.
  assert [top[i]["kernel"].shape for i in sorted(top)] == [(367, 512), (512, 256), (256, 1)]
  w = np.asarray(bottom[1]["kernel"])
  assert w.dtype == np.float32
  assert abs(w.std() - np.sqrt(2 / (512 + 256))) < 0.05 * np.sqrt(2 / (512 + 256))
  b = np.asarray(bottom[1]["bias"])
  assert abs(b.std() - np.sqrt(1 / 256)) < 0.2 * np.sqrt(1 / 256)


def test_jit_forward_dtype_and_shape():
  spec = ModelSpec(num_dense=13, embedding_dim=4, bottom=(13, 4), top=(3, 1),
                   table_rows=(5, 5))
  model = nnx.merge(nnx.graphdef(abstract_model(spec)),
                    init_params(spec, 0))
  out = jax.jit(lambda d, e: model(d, e))(jnp.ones((2, 13)), jnp.ones((2, 2, 4)))
  assert out.shape == (2,) and out.dtype == jnp.float32


def test_dcn_shapes_width_and_torchrec_init():
  spec = ModelSpec(num_dense=13, embedding_dim=16, bottom=(13, 64, 16), top=(256, 1),
                   table_rows=(100,) * 26, interaction="dcn", dcn_num_layers=3,
                   dcn_low_rank_dim=128)
  assert spec.interaction_width == 27 * 16  # x0's width, derived as for dot and cat
  values = nnx.to_pure_dict(init_params(spec, seed=0))
  layers = values["interaction"]["layers"]
  assert len(layers) == 3
  for layer in layers.values():
    assert layer["v"]["kernel"].shape == (432, 128) and "bias" not in layer["v"]
    assert layer["w"]["kernel"].shape == (128, 432) and layer["w"]["bias"].shape == (432,)
    std = np.sqrt(2 / (432 + 128))  # xavier normal
    for name in ("v", "w"):
      assert abs(np.asarray(layer[name]["kernel"]).std() - std) < 0.05 * std
    np.testing.assert_array_equal(layer["w"]["bias"], 0.0)
  assert values["top"]["layers"][0]["kernel"].shape == (432, 256)
  # Drawn in order: the MLPs' draws are the same as without cross layers.
  dot = nnx.to_pure_dict(init_params(ModelSpec(num_dense=13, embedding_dim=16,
                                               bottom=(13, 64, 16), top=(256, 1),
                                               table_rows=(100,) * 26, interaction="cat"),
                                     seed=0))
  np.testing.assert_array_equal(dot["bottom"]["layers"][0]["kernel"],
                                values["bottom"]["layers"][0]["kernel"])


@pytest.mark.parametrize("field,value,match", [
    ("dcn_num_layers", 0, "dcn_num_layers=0"),
    ("dcn_low_rank_dim", 0, "dcn_low_rank_dim=0"),
    ("arch_dot_pair_order", "diagonal", "arch_dot_pair_order"),
    ("compute_dtype", "float16", "compute_dtype"),
])
def test_interaction_config_errors(field, value, match):
  c = base_config()
  c.arch_interaction_op = "dcn"
  c.arch_mlp_top = "64-1"
  c[field] = value
  with pytest.raises(ConfigError, match=match):
    ModelSpec.from_config(c)


@pytest.mark.parametrize("op", ["dot", "cat", "dcn"])
def test_bfloat16_products_accumulate_and_return_float32(op):
  """The promise of bfloat16 compute (`accumulation_dtype`), read off the program: every
  matrix product of the forward and backward pass returns float32 (its accumulator's
  type), and the forward's take bfloat16 operands."""
  import re

  kw = dict(num_dense=13, embedding_dim=8, bottom=(13, 16, 8), top=(12, 1),
            table_rows=(10, 20), interaction=op, dcn_num_layers=2, dcn_low_rank_dim=4)
  spec = ModelSpec(**kw, compute_dtype="bfloat16")
  graphdef, params = nnx.graphdef(abstract_model(spec)), init_params(spec, seed=0)

  def loss(p, dense, emb):
    return nnx.merge(graphdef, p)(dense, emb).sum()

  dense, emb = jnp.ones((64, 13), jnp.float32), jnp.ones((64, 2, 8), jnp.float32)
  text = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(params, dense, emb).as_text()
  products = [l for l in text.splitlines() if "stablehlo.dot_general" in l]
  types = [re.search(r"\((.*)\) -> tensor<[\dx]*x(\w+)>", l).groups() for l in products]
  assert len(products) >= 4, text
  assert all(result == "f32" for _, result in types), [l.strip()[-90:] for l in products]
  assert sum("bf16" in operands for operands, _ in types) >= 2, types


@pytest.mark.parametrize("op", ["dot", "dcn"])
def test_bfloat16_compute_keeps_float32_params_and_logits(op):
  kw = dict(num_dense=13, embedding_dim=8, bottom=(13, 16, 8), top=(12, 1),
            table_rows=(10, 20), interaction=op, dcn_num_layers=2, dcn_low_rank_dim=4)
  spec32, spec16 = ModelSpec(**kw), ModelSpec(**kw, compute_dtype="bfloat16")
  params = init_params(spec16, seed=0)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  rng = np.random.default_rng(0)
  dense = jnp.asarray(rng.random((64, 13)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(64, 2, 8)), jnp.float32)
  model16 = nnx.merge(nnx.graphdef(abstract_model(spec16)), params)
  model32 = nnx.merge(nnx.graphdef(abstract_model(spec32)), params)
  jaxpr = str(jax.make_jaxpr(lambda d, e: model16(d, e))(dense, emb))
  assert "bf16" in jaxpr and "dot_general" in jaxpr
  lo, hi = model16(dense, emb), model32(dense, emb)
  assert lo.dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa: logits agree to about 1%.
  np.testing.assert_allclose(np.asarray(lo), np.asarray(hi), rtol=0.05, atol=0.05)
  assert not np.array_equal(np.asarray(lo), np.asarray(hi))
