"""What the benchmarks share: their models from configs/, random batches, runs taking turns.

The scripts are run as `python benchmarks/X.py`, which puts this directory on
sys.path, so each imports this module as `common`; no script imports another.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import statistics
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, **overrides):
  """get_config() of configs/NAME.py with `overrides` set on it.

  configs/ is not installed with dlrm_jax, so the file is imported by its path.
  A nested field takes a dict (`data={"kind": "random"}`); a field the config
  does not have is refused (KeyError) rather than added.
  """
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.lock()
  try:
    config.update(overrides)
  finally:
    config.unlock()
  return config


def random_data_config(rows: int | None, batch: int, lr: float, optimizer: str,
                       devices: int = 1, **overrides):
  """configs/criteo_kaggle.py's model on random data and `devices` devices: every table `rows`
  rows (None: the config's own sizes), global batch `batch`, embedding optimiser `optimizer`."""
  config = load_config("criteo_kaggle", mini_batch_size=batch, learning_rate=lr,
                       embedding_optimizer=optimizer, data={"kind": "random"},
                       mesh={"num_devices": devices}, **overrides)
  if rows is not None:
    tables = len(config.arch_embedding_size.split("-"))
    config.arch_embedding_size = "-".join([str(rows)] * tables)
  return config


def add_shape_arguments(parser) -> None:
  """--dim, --bottom and --top: the model's shape, configs/criteo_kaggle.py's unless given."""
  config = load_config("criteo_kaggle")
  parser.add_argument("--dim", type=int, default=config.arch_sparse_feature_size,
                      help="embedding dimension")
  parser.add_argument("--bottom", default=config.arch_mlp_bot, help="bottom MLP (ends at --dim)")
  parser.add_argument("--top", default=config.arch_mlp_top, help="top MLP")


def random_batches(task, batch: int, pool: int, seed: int = 1):
  """`pool` random batches of `batch` rows for `task`, checked and on its devices."""
  from dlrm_jax.data import RandomData

  gen = RandomData(task.spec.table_rows, task.spec.num_dense, batch, seed)
  batches = [gen.batch(i) for i in range(pool)]
  for b in batches:
    task.collection.check_ids(b["sparse"])
  return [task.device_batch(b) for b in batches]


def take_turns(runs: dict, rounds: int, warmup: int) -> dict:
  """Times one step of every run per round, in an order rotated every round.

  `runs[name] = [step_fn, state, batches]`; each state is replaced by its
  step's output and round r feeds batches[r % len(batches)]. Returns
  {"times": {name: [seconds per counted round]}, "losses": {name: [loss per
  round]}, "cpu": {name: [user + system CPU seconds per counted round]},
  "faults": {name: [minor page faults per counted round]}}. Taking turns step by
  step makes the machine's swings (10x within seconds on a shared VM) fall on
  every run alike; CPU time and page faults tell work from waiting.
  """
  import jax

  names = list(runs)
  times, losses, cpu, faults = ({n: [] for n in names} for _ in range(4))
  for r in range(warmup + rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      step_fn, state, batches = runs[name]
      u0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      state, out = step_fn(state, batches[r % len(batches)])
      jax.block_until_ready(state)
      dt, u1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
      runs[name][1] = state
      if r >= warmup:
        times[name].append(dt)
        cpu[name].append(u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime)
        faults[name].append(u1.ru_minflt - u0.ru_minflt)
      losses[name].append(float(out["loss"]))
    if r >= warmup:  # as it goes: a run stopped by a time limit still leaves its rounds
      print(f"round {r - warmup + 1}/{rounds}: " + "  ".join(
          f"{n}={times[n][-1] * 1e3:,.1f} ms (cpu {cpu[n][-1] * 1e3:,.0f} ms, "
          f"{faults[n][-1]:,} faults)" for n in names), flush=True)
  return {"times": times, "losses": losses, "cpu": cpu, "faults": faults}


def turn_row(times: list, base: list) -> str:
  """'median | p10 | time / base (median over rounds)' cells of a results table."""
  ordered = sorted(times)
  ratio = statistics.median(x / y for x, y in zip(times, base))
  return (f"{statistics.median(times) * 1e3:,.1f} ms | {ordered[len(ordered) // 10] * 1e3:,.1f} ms"
          f" | {ratio:.2f}")
