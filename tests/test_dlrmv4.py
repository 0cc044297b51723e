"""DLRMv4's model around the encoder (dlrm_jax.dlrmv4): the sequence it builds, what
its logits depend on and what they do not, the time features and the loss against
numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlrm_jax import dlrmv4
from dlrm_jax.config import ConfigError

SPEC = dlrmv4.DLRMv4Spec(embedding_dim=16, preprocessor_hidden_dim=8, action_dim=4,
                         num_heads=2, attention_dim=8, hidden_dim=8, num_layers=2,
                         num_position_buckets=64, num_time_buckets=32)


def make_batch(seed=0, b=4, width=10, lengths=(0, 1, 6, 10)):
  rng = np.random.default_rng(seed)
  d = SPEC.embedding_dim
  vec = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  ts = np.sort(rng.integers(0, 10 ** 6, (b, width)), axis=1).astype(np.int32)
  n = np.asarray(lengths, np.int32)
  last = np.where(n > 0, ts[np.arange(b), np.maximum(n - 1, 0)], 5_000).astype(np.int32)
  return {"history": {"item": vec(b, width, d), "artist": vec(b, width, d),
                      "album": vec(b, width, d)},
          "history_actions": jnp.asarray(rng.choice([1, 2, 4], (b, width)), jnp.int32),
          "history_timestamps": jnp.asarray(ts), "history_lengths": jnp.asarray(n),
          "candidate": {"item": vec(b, d), "artist": vec(b, d), "album": vec(b, d)},
          "query_time": jnp.asarray(last), "contextual": vec(b, SPEC.num_contextual, d)}


@pytest.fixture(scope="module")
def model():
  return dlrmv4.DLRMv4(SPEC, rngs=nnx.Rngs(0))


_apply = nnx.jit(lambda m, x: m(x))


def logits(model, batch):
  return np.asarray(_apply(model, batch))


def test_logits_are_finite(model):
  out = logits(model, make_batch())
  assert out.shape == (4,) and np.all(np.isfinite(out))


def test_padding_and_what_lies_beyond_a_history_change_nothing(model):
  batch = make_batch()
  want = logits(model, batch)
  # Wider padding, filled with noise: the same logits.
  wide = make_batch(width=14, lengths=(0, 1, 6, 10))
  for k in ("item", "artist", "album"):
    wide["history"][k] = wide["history"][k].at[:, :10].set(batch["history"][k])
  for k in ("history_actions", "history_timestamps"):
    wide[k] = wide[k].at[:, :10].set(batch[k])
  wide = {**batch, "history": wide["history"], "history_actions": wide["history_actions"],
          "history_timestamps": wide["history_timestamps"]}
  np.testing.assert_allclose(logits(model, wide), want, rtol=1e-5, atol=1e-6)


def test_the_history_and_the_context_matter(model):
  batch = make_batch()
  want = logits(model, batch)
  moved = dict(batch, history={**batch["history"],
                               "item": batch["history"]["item"].at[3, 4].add(1.0)})
  got = logits(model, moved)  # the examples do not mix (the longest one is unchanged)
  assert got[3] != want[3] and np.array_equal(got[:3], want[:3])
  other = dict(batch, contextual=batch["contextual"].at[0].add(1.0))
  assert logits(model, other)[0] != want[0]
  acted = dict(batch, history_actions=batch["history_actions"].at[2, 0].set(7))
  assert logits(model, acted)[2] != want[2]


def test_the_sequence_puts_the_candidate_after_each_history(model):
  batch = make_batch()
  x, ts, lengths = nnx.jit(lambda m, b: m.sequence(b))(model, batch)
  c = SPEC.num_contextual
  np.testing.assert_array_equal(np.asarray(lengths), c + np.array([0, 1, 6, 10]) + 1)
  np.testing.assert_array_equal(np.asarray(ts)[:, :c], 0)
  x = np.asarray(x, np.float64)
  h, cand = batch["history"], batch["candidate"]
  past = np.asarray(model.events(h["item"], h["artist"], h["album"],
                                 model.encode_actions(batch["history_actions"])))
  actions = jnp.broadcast_to(model.candidate_action[...], (4, model.candidate_action.shape[0]))
  cands = np.asarray(model.events(cand["item"], cand["artist"], cand["album"], actions))
  w, bias = (np.asarray(p[...], np.float64) for p in (model.contextual_weight,
                                                       model.contextual_bias))
  ctx = np.einsum("bsd,sde->bse", np.asarray(batch["contextual"], np.float64), w) + bias
  np.testing.assert_allclose(x[:, :c], ctx, rtol=1e-4, atol=1e-5)
  for b, n in enumerate([0, 1, 6, 10]):
    np.testing.assert_allclose(x[b, c:c + n], past[b, :n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x[b, c + n], cands[b], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x[b, c + n + 1:], 0)
    np.testing.assert_array_equal(np.asarray(ts)[b, c:c + n],
                                  np.asarray(batch["history_timestamps"])[b, :n])
    assert ts[b, c + n] == batch["query_time"][b]
  bits = np.asarray(model.encode_actions(jnp.asarray([[1, 6, 0]])))[0]
  table = np.asarray(model.action_table[...])
  np.testing.assert_array_equal(bits[0], np.concatenate([table[0], 0 * table[1], 0 * table[2]]))
  np.testing.assert_array_equal(bits[1], np.concatenate([0 * table[0], table[1], table[2]]))
  np.testing.assert_array_equal(bits[2], 0)


def test_the_logit_is_the_candidates_output_through_the_user_and_item_sides(model):
  """The wiring after the encoder, step by step with the model's own parts: the user
  side from the candidate's position (each sequence's last), the time features of
  the query time, the item side of the candidate's three embeddings, the head."""
  batch = make_batch()
  x, ts, lengths = model.sequence(batch)
  out = np.asarray(model.encoder(x, ts, lengths, jnp.ones_like(lengths),
                                 max_seq_len=int(np.max(lengths))))
  user = out[np.arange(4), np.asarray(lengths) - 1]
  user = model.output_norm(model.output_projection(
      jnp.concatenate([user, dlrmv4.time_features(batch["query_time"])], axis=-1)))
  c = batch["candidate"]
  item = model.item(jnp.concatenate([c["item"], c["artist"], c["album"]], axis=-1))
  want = np.asarray(model.head_out(model.head_swish(model.head_hidden(user * item))))[:, 0]
  np.testing.assert_allclose(logits(model, batch), want, rtol=1e-4, atol=1e-5)


def test_time_features_and_loss_against_numpy():
  t = np.array([0, 3599, 3600, 86399, 86400 * 3 + 7200, 10 ** 9], np.int64)
  want = []
  for period, cycle in dlrmv4.TIME_FEATURES:
    a = 2 * 3.14 * ((t // period) % cycle) / cycle
    want += [np.cos(a), np.sin(a)]
  np.testing.assert_allclose(np.asarray(dlrmv4.time_features(jnp.asarray(t, jnp.int32))),
                             np.stack(want, -1), atol=1e-6)
  z = np.array([-30.0, -1.0, 0.0, 2.0, 40.0])
  y = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
  p = 1 / (1 + np.exp(-z.astype(np.float64)))
  bce = -(y * np.log(np.clip(p, 1e-300, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-300, 1)))
  bce[0] = 30.0 * 0 + np.log1p(np.exp(-30.0))  # label 0 at -30: log(1 + e^-30)
  bce[4] = np.log1p(np.exp(-40.0))
  assert float(dlrmv4.loss(jnp.asarray(z), jnp.asarray(y))) == pytest.approx(
      0.2 * bce.mean(), rel=1e-6)


def test_every_parameter_gets_a_gradient(model):
  batch = make_batch()
  labels = jnp.asarray([1.0, 0.0, 1.0, 0.0])
  grads = nnx.jit(nnx.grad(lambda m: dlrmv4.loss(m(batch), labels)))(model)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  # The position and time tables have rows no sequence here reaches; every other
  # parameter moves.
  flat, _ = jax.tree_util.tree_flatten_with_path(nnx.state(grads, nnx.Param))
  dead = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g))]
  assert all("positions" in p or "times" in p for p in dead), dead


def test_the_reference_sizes_are_the_default():
  spec = dlrmv4.DLRMv4Spec()
  enc = spec.encoder
  assert (enc.embedding_dim, enc.num_heads, enc.attention_dim, enc.hidden_dim, enc.num_layers,
          enc.num_position_buckets, enc.num_time_buckets, enc.pos_contextual_seq_len) == (
              512, 4, 128, 128, 3, 8192, 2048, 8)
  with pytest.raises(ConfigError, match="num_layers=0 must be >= 1"):
    dlrmv4.DLRMv4Spec(num_layers=0)
