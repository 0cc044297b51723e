"""DLRMv4's HSTU encoder (dlrm_jax.hstu) against the reference's parity fixtures.

The fixtures (shared/data/reference_parity/hstu/, described by its README.md) come from
MLPerf's DLRMv4 reference (mlcommons/training PR #889) in float32 and float64: inputs,
parameters, the output, every intermediate and the gradients of sum(output *
loss_weight). hstu_a is DLRMv4's wiring (positional contextual prefix 2, no STU
contextual prefix, no window; lengths 1, 16 = N, 6, 11); hstu_b has an STU contextual
prefix 3, a window of 6, d_qk != d_v and clamped ids (lengths 20 = N, 1, 0, 5, 13). So
the comparisons below cover lengths 0, 1, ragged and full.

The float64 cases turn jax_enable_x64 on for their own computation only.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import PARITY_DIR
from dlrm_jax import hstu
from dlrm_jax.config import ConfigError

FIXTURES = os.path.join(PARITY_DIR, "hstu")
CONFIGS = ("hstu_a", "hstu_b")
CASES = [(c, d) for c in CONFIGS for d in ("f32", "f64")]
# The fixtures' README: atol 1e-5 (outputs), 5e-5 (gradients, which reach about 20) in
# float32; about 1e-10 in float64.
ATOL = {"f32": {"out": 1e-5, "grad": 5e-5}, "f64": {"out": 1e-10, "grad": 1e-10}}

pytestmark = pytest.mark.skipif(not os.path.isdir(FIXTURES), reason=f"no {FIXTURES}")


@functools.lru_cache(maxsize=None)
def _fixture(config: str, dtype: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(FIXTURES, f"{config}_{dtype}.npz")) as f:
    return dict(f)


def _spec(f) -> hstu.HSTUSpec:
  c = {k.removeprefix("config/"): int(v) for k, v in f.items() if k.startswith("config/")}
  assert c.pop("target_aware") == 1
  return hstu.HSTUSpec(
      embedding_dim=c["embedding_dim"], num_heads=c["num_heads"],
      attention_dim=c["attention_dim"], hidden_dim=c["hidden_dim"], num_layers=c["num_layers"],
      num_position_buckets=c["num_position_buckets"], num_time_buckets=c["num_time_buckets"],
      pos_contextual_seq_len=c["pos_contextual_seq_len"],
      contextual_seq_len=c["stu_contextual_seq_len"], max_attn_len=c["max_attn_len"])


def _model(f, dtype: str) -> hstu.HSTU:
  model = hstu.HSTU(_spec(f), rngs=nnx.Rngs(0),
                    dtype=jnp.float64 if dtype == "f64" else jnp.float32)
  hstu.load_reference(model, {k.removeprefix("param/"): v for k, v in f.items()
                              if k.startswith("param/")})
  return model


@functools.lru_cache(maxsize=None)
def _run(config: str, dtype: str, capacity: int = 0, attention=hstu.dense_attention,
         x_change: tuple = ()) -> dict[str, np.ndarray]:
  """The fixture's input through the encoder padded to `capacity` (0: N) with the
  fixture's N as the attention's divisor, `x_change` = (token, scale): scale *
  linspace(-1, 1, D) added to x_values[token] (a constant would vanish in the layer
  norms): the output, intermediates, loss and gradients, jagged, as numpy."""
  f = _fixture(config, dtype)
  n, offsets, num_tokens = int(f["max_seq_len"]), f["x_offsets"], len(f["x_values"])
  x_values = f["x_values"].copy()
  if x_change:
    token, scale = x_change
    x_values[token] += scale * np.linspace(-1, 1, x_values.shape[1], dtype=x_values.dtype)
  with jax.enable_x64(dtype == "f64"):
    graphdef, params = nnx.split(_model(f, dtype))
    jagged = functools.partial(hstu.padded_to_jagged, offsets=offsets, num_tokens=num_tokens)

    def loss(params, x_values):
      padded = lambda v: hstu.jagged_to_padded(v, offsets, capacity or n)
      out, parts = nnx.merge(graphdef, params)(
          padded(x_values), padded(jnp.asarray(f["timestamps"])), jnp.asarray(f["x_lengths"]),
          jnp.asarray(f["num_targets"]), max_seq_len=n, attention=attention, intermediates=True)
      out = jagged(out)
      return jnp.sum(out * f["loss_weight"]), (out, {k: jagged(v) for k, v in parts.items()})

    (value, (out, parts)), (g_params, g_x) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(x_values))
    grads = hstu.to_reference(_spec(f), g_params) | {"x_values": g_x}
    return {"loss": np.asarray(value), "output": np.asarray(out)} | {
        f"intermediate/{k}": np.asarray(v) for k, v in parts.items()} | {
        f"grad/{k}": np.asarray(v) for k, v in grads.items()}


@pytest.mark.parametrize("config,dtype", CASES)
def test_output_and_intermediates_match_reference(config, dtype):
  """The output, the positional encoder's output and each layer's SiLU(U), attention
  output O and output, for every token of sequences of lengths 0, 1, ragged and N."""
  f, got = _fixture(config, dtype), _run(config, dtype)
  names = ["output"] + [k for k in f if k.startswith("intermediate/") and f[k].dtype.kind == "f"]
  assert len(names) == 2 + 3 * int(f["config/num_layers"])
  for name in names:
    assert got[name].dtype == f[name].dtype, name
    np.testing.assert_allclose(got[name], f[name], rtol=0, atol=ATOL[dtype]["out"], err_msg=name)


@pytest.mark.parametrize("config,dtype", CASES)
def test_gradients_match_reference(config, dtype):
  """d sum(output * loss_weight) / d every parameter (under the reference's names) and
  d / d x_values; unused table rows have zero gradient here as there."""
  f, got = _fixture(config, dtype), _run(config, dtype)
  names = [k for k in f if k.startswith("grad/")]
  assert len(names) == 3 + 7 * int(f["config/num_layers"])
  for name in names:
    np.testing.assert_allclose(got[name], f[name], rtol=0, atol=ATOL[dtype]["grad"], err_msg=name)
  np.testing.assert_allclose(got["loss"], f["loss"], rtol=ATOL[dtype]["out"])


@pytest.mark.parametrize("config", CONFIGS)
def test_ids_and_mask_equal_reference(config):
  """Position ids (contextual prefix, counted from the end, clamped at P-1), time buckets
  (clamped at D-1) and the attention mask (target-aware, causal; hstu_b: contextual
  prefix and window) are the reference's exactly, on every valid token."""
  f = _fixture(config, "f32")
  spec, n, offsets = _spec(f), int(f["max_seq_len"]), f["x_offsets"]
  lengths, targets = jnp.asarray(f["x_lengths"]), jnp.asarray(f["num_targets"])
  pos = hstu.position_ids(lengths, targets, n, contextual_seq_len=spec.pos_contextual_seq_len,
                          num_buckets=spec.num_position_buckets)
  ts = hstu.jagged_to_padded(jnp.asarray(f["timestamps"]), offsets, n)
  buckets = hstu.time_bucket_ids(ts, lengths, embedding_dim=spec.embedding_dim)
  np.testing.assert_array_equal(hstu.padded_to_jagged(pos, offsets), f["intermediate/position_ids"])
  np.testing.assert_array_equal(hstu.padded_to_jagged(buckets, offsets),
                                f["intermediate/time_bucket_ids"])
  idx = jnp.arange(n)
  mask = np.asarray(hstu.AttentionMask(lengths, targets, spec.contextual_seq_len,
                                       spec.max_attn_len, n)(idx, idx))
  for b, length in enumerate(f["x_lengths"]):
    np.testing.assert_array_equal(mask[b, :length, :length],
                                  f["intermediate/attn_valid_mask"][b, :length, :length])
    assert not mask[b, length:].any() and not mask[b, :, length:].any()


def test_causal_and_target_aware():
  """hstu_a (no STU contextual prefix): changing history event 9 of the length-16
  sequence changes no earlier token's output and changes its own and every later one;
  changing the first of two targets of the length-6 sequence changes no history token
  and not the other target."""
  f = _fixture("hstu_a", "f32")
  base = _run("hstu_a", "f32")["output"]
  start = int(f["x_offsets"][1])
  history = _run("hstu_a", "f32", x_change=(start + 9, 0.5))["output"]
  np.testing.assert_array_equal(history[start:start + 9], base[start:start + 9])
  later = np.abs(history[start + 9:start + 16] - base[start + 9:start + 16]).max(axis=1)
  assert (later > 1e-3).all(), later
  start = int(f["x_offsets"][2])  # length 6, targets at 4 and 5
  target = _run("hstu_a", "f32", x_change=(start + 4, 0.5))["output"]
  np.testing.assert_array_equal(target[start:start + 4], base[start:start + 4])
  np.testing.assert_array_equal(target[start + 5], base[start + 5])
  assert np.abs(target[start + 4] - base[start + 4]).max() > 1e-3


@pytest.mark.parametrize("config", CONFIGS)
def test_padding_invariance(config):
  """Padded to N + 5 with the same divisor N, the valid tokens' outputs and every
  gradient are those of the unpadded run (float64: to 1e-12)."""
  f = _fixture(config, "f64")
  tight, wide = _run(config, "f64"), _run(config, "f64", capacity=int(f["max_seq_len"]) + 5)
  assert wide.keys() == tight.keys()
  for name in tight:
    np.testing.assert_allclose(wide[name], tight[name], rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("config,chunk", [("hstu_a", 4), ("hstu_b", 6)])
def test_chunked_attention_equals_dense(config, chunk):
  """Blocks of queries (hstu_b: 6 does not divide N = 20, so the last block is padded)
  give the dense attention's outputs, intermediates and gradients (float64: to 1e-12)."""
  attention = functools.partial(hstu.chunked_attention, chunk_size=chunk)
  dense, chunked = _run(config, "f64"), _run(config, "f64", attention=attention)
  assert dense.keys() == chunked.keys()
  for name in dense:
    np.testing.assert_allclose(chunked[name], dense[name], rtol=0, atol=1e-12, err_msg=name)


def test_chunked_attention_never_holds_full_scores():
  """At N = 4096, the chunked attention's forward and backward programs have no
  [.., 4096, 4096] value (the dense one's do): blocks of 512 queries at a time."""
  b, n, h, d = 2, 4096, 2, 8
  q = jax.ShapeDtypeStruct((b, n, h, d), jnp.float32)
  lengths = jax.ShapeDtypeStruct((b,), jnp.int32)

  def program(attention):
    def loss(q, k, v, lengths):
      mask = hstu.AttentionMask(lengths, lengths // 4, 0, 0, n)
      return jnp.sum(attention(q, k, v, mask))
    return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q, lengths))

  assert f"{n},{n}]" in program(hstu.dense_attention)
  chunked = program(functools.partial(hstu.chunked_attention, chunk_size=512))
  assert f"{n},{n}]" not in chunked and f"512,{n}]" in chunked


def test_jagged_round_trip():
  """hstu_b's jagged values (lengths 20, 1, 0, 5, 13) padded to 22 and back are
  unchanged, with zeros after each sequence; a capacity below the longest length is
  refused."""
  f = _fixture("hstu_b", "f32")
  offsets, values = f["x_offsets"], f["x_values"]
  padded = np.asarray(hstu.jagged_to_padded(jnp.asarray(values), offsets, 22))
  assert padded.shape == (5, 22, values.shape[1])
  for b, length in enumerate(f["x_lengths"]):
    np.testing.assert_array_equal(padded[b, :length], values[offsets[b]:offsets[b + 1]])
    assert not padded[b, length:].any()
  np.testing.assert_array_equal(hstu.padded_to_jagged(padded, offsets), values)
  with pytest.raises(ValueError, match="20 tokens does not fit a padded capacity of 19"):
    hstu.jagged_to_padded(jnp.asarray(values), offsets, 19)


def test_load_reference_refuses_other_names_and_shapes():
  """Loading names exactly the reference's parameters at their shapes."""
  f = _fixture("hstu_b", "f32")
  arrays = {k.removeprefix("param/"): v for k, v in f.items() if k.startswith("param/")}
  model = hstu.HSTU(_spec(f), rngs=nnx.Rngs(0))
  name = "_stu_module._stu_layers.1._uvqk_beta"
  with pytest.raises(ValueError, match=rf"missing \['{name}'\], unknown \['x'\]"):
    hstu.load_reference(model, {k: v for k, v in arrays.items() if k != name} | {"x": 0})
  with pytest.raises(ValueError, match=rf"{name} has shape \(79,\), expected \(80,\)"):
    hstu.load_reference(model, arrays | {name: arrays[name][1:]})


def test_spec_refuses_a_time_table_below_the_clamp():
  """Time buckets are clamped at D - 1 (the reference's quirk), so the time table needs
  at least D rows."""
  with pytest.raises(ConfigError, match="needs num_time_buckets >= 31, got 16"):
    hstu.HSTUSpec(embedding_dim=32, num_heads=2, attention_dim=16, hidden_dim=16, num_layers=1,
                  num_position_buckets=32, num_time_buckets=16)


def test_dropout_keeps_the_expectation_and_draws_from_its_key():
  """hstu.dropout zeroes about `rate` of the values and scales the rest by 1 / (1 - rate),
  the same for a key and other for another; rate 0 is the identity."""
  x = jnp.arange(1, 40001, dtype=jnp.float32).reshape(200, 200)
  key = jax.random.key(3)
  out = np.asarray(hstu.dropout(x, 0.25, key))
  kept = out != 0
  assert abs(kept.mean() - 0.75) < 0.01
  np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  np.testing.assert_array_equal(out, hstu.dropout(x, 0.25, key))
  assert (np.asarray(hstu.dropout(x, 0.25, jax.random.key(4))) != out).any()
  assert hstu.dropout(x, 0.0, key) is x
