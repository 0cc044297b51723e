"""dlrm_jax.functional: the pure functions compose with jax.vmap, jax.grad and
jax.lax.scan, and give what the task's jitted, donating train step gives."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from dlrm_jax.data import SyntheticCTR
from dlrm_jax.task import Task


@pytest.fixture
def task(tiny_config):
  # Optimisers with state on both sides, so that their slots are stepped too.
  tiny_config.dense_optimizer, tiny_config.embedding_optimizer = "adam", "rowwise_adagrad"
  tiny_config.learning_rate, tiny_config.lr_num_warmup_steps = 0.05, 4  # a rate per step
  return Task(tiny_config)


def _batches(task, n, seed=0):
  """n batches laid out over the task's mesh."""
  data = SyntheticCTR(task.spec.table_rows, task.spec.num_dense, 64, seed=seed)
  return [task.device_batch(data.batch(i)) for i in range(n)]


def _assert_states_close(got, want, rtol=1e-5, atol=1e-6):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                          strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_vmap_over_seeds_equals_single_runs(task):
  """Four seeds stacked and stepped by one vmapped train step end where each seed
  trained alone by the task's (jitted, donating) train step ends."""
  fns, seeds, batches = task.functions, [0, 1, 2, 3], _batches(task, 3)
  ensemble = jax.tree.map(lambda *x: jnp.stack(x), *[fns.init(s) for s in seeds])
  step = jax.jit(jax.vmap(fns.train_step, in_axes=(0, None)))
  losses = []
  for batch in batches:
    ensemble, out = step(ensemble, batch)
    losses.append(out["loss"])
  assert np.asarray(losses).shape == (3, 4)
  for k, seed in enumerate(seeds):
    alone = task.init_state(seed)
    for i, batch in enumerate(batches):
      alone, out = task.train_step(alone, batch)
      np.testing.assert_allclose(losses[i][k], out["loss"], rtol=1e-6)
    _assert_states_close(jax.tree.map(lambda x: x[k], ensemble), alone)
  # The members started apart and stayed apart.
  first = np.asarray(ensemble.tables["table_wise"])
  assert not np.allclose(first[0], first[1])


def test_grad_of_loss_equals_finite_differences(task):
  """jax.grad of `loss` with respect to the dense parameters equals the loss's central
  differences, along a direction in each parameter array (its gradient's, turned by a
  random one of half its norm)."""
  fns = task.functions
  state, batch = fns.init(0), _batches(task, 1, seed=5)[0]
  loss = jax.jit(fns.loss)
  grads = jax.jit(jax.grad(fns.loss))(state.params, state.tables, batch)
  leaves, treedef = jax.tree.flatten(state.params)
  rng, eps = np.random.default_rng(0), 1e-3
  for i, g in enumerate(jax.tree.leaves(grads)):
    g = np.asarray(g)
    noise = rng.normal(size=g.shape)
    v = g / np.linalg.norm(g) + 0.5 * noise / np.linalg.norm(noise)
    v = (v / np.linalg.norm(v)).astype(np.float32)

    def moved(t, i=i, v=v):
      return jax.tree.unflatten(treedef, [x + t * v if j == i else x
                                          for j, x in enumerate(leaves)])

    numeric = (loss(moved(eps), state.tables, batch)
               - loss(moved(-eps), state.tables, batch)) / (2 * eps)
    analytic = float(np.vdot(g, v))
    assert abs(analytic) > 1e-3  # a direction the loss moves along
    assert float(numeric) == pytest.approx(analytic, rel=1e-3, abs=1e-4), i


def test_scan_over_steps_equals_calls(task):
  """jax.lax.scan of `train_step` over 10 stacked batches equals 10 calls of the
  task's train step, state and losses."""
  fns, batches = task.functions, _batches(task, 10, seed=1)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
  scanned, out = jax.jit(lambda s, bs: jax.lax.scan(fns.train_step, s, bs))(
      fns.init(0), stacked)
  state, losses = task.init_state(0), []
  for batch in batches:
    state, step_out = task.train_step(state, batch)
    losses.append(float(step_out["loss"]))
  assert int(scanned.step) == 10
  np.testing.assert_allclose(np.asarray(out["loss"]), losses, rtol=1e-5)
  _assert_states_close(scanned, state)


def test_documented_example_runs(tmp_path):
  """docs/functional.md's example, run as a script."""
  with open(os.path.join(REPO, "docs", "functional.md")) as f:
    example = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
  script = tmp_path / "example.py"
  script.write_text(example)
  env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src"), "XLA_FLAGS": ""}
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ensemble loss" in proc.stdout and "scanned loss" in proc.stdout, proc.stdout
