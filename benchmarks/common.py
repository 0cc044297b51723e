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
# The real Criteo rows beside the project (`--kaggle` of the scripts that train on them).
KAGGLE_HEAD = os.path.join(REPO, "..", "shared", "data", "criteo", "kaggle_train_head10k.tsv")


def child_result(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
  """Runs a benchmark's child process (which prints `RESULT {json}`) and returns that
  JSON, or {"failed": why} (its exit status and the end of its stderr, or a timeout)."""
  import json
  import subprocess

  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
  except subprocess.TimeoutExpired:
    return {"failed": f"timed out after {timeout:.0f} s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    return {"failed": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
  return json.loads(lines[-1][len("RESULT "):])


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


def random_data_config(rows: int | None, batch: int, lr: float, optimizer: str | None,
                       devices: int = 1, config: str = "criteo_kaggle", **overrides):
  """configs/CONFIG.py's model (the Kaggle one unless given) on random data and `devices`
  devices: every table `rows` rows (None: the config's own sizes), global batch `batch`,
  embedding optimiser `optimizer` (None: the config's own)."""
  if optimizer is not None:
    overrides["embedding_optimizer"] = optimizer
  data = {"kind": "random", **overrides.pop("data", {})}
  c = load_config(config, mini_batch_size=batch, learning_rate=lr, data=data,
                  mesh={"num_devices": devices}, **overrides)
  if rows is not None:
    tables = len(c.arch_embedding_size.split("-"))
    c.arch_embedding_size = "-".join([str(rows)] * tables)
  return c


def parse_settings(settings: list[str]) -> dict:
  """["data.hotness=3-2-1", "compute_dtype=bfloat16"] -> nested overrides for `load_config`
  (numbers and true/false become ints, floats and bools)."""
  out: dict = {}
  for item in settings:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    value: object = text
    if text.lower() in ("true", "false"):
      value = text.lower() == "true"
    else:
      for cast in (int, float):
        try:
          value = cast(text)
          break
        except ValueError:
          pass
    *parents, leaf = key.split(".")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def add_shape_arguments(parser) -> None:
  """--config (the model's configs/ file, criteo_kaggle unless given), --dim, --bottom and
  --top (its shape, the config's own unless given) and --set KEY=VALUE (any other field)."""
  parser.add_argument("--config", default="criteo_kaggle", help="configs/NAME.py of the model")
  parser.add_argument("--dim", type=int, default=None, help="embedding dimension")
  parser.add_argument("--bottom", default=None, help="bottom MLP (ends at --dim)")
  parser.add_argument("--top", default=None, help="top MLP")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config field, e.g. compute_dtype=bfloat16 (repeatable)")


def shape_overrides(a) -> dict:
  """The config overrides of add_shape_arguments' arguments (for random_data_config)."""
  out = parse_settings(a.set)
  for name, field in (("dim", "arch_sparse_feature_size"), ("bottom", "arch_mlp_bot"),
                      ("top", "arch_mlp_top")):
    if getattr(a, name) is not None:
      out[field] = getattr(a, name)
  return {"config": a.config, **out}


def shape_arguments(a) -> list[str]:
  """add_shape_arguments' arguments as given, for a child process's command line."""
  out = ["--config", a.config]
  for name in ("dim", "bottom", "top"):
    if getattr(a, name) is not None:
      out += [f"--{name}", str(getattr(a, name))]
  for item in a.set:
    out += ["--set", item]
  return out


def random_batches(task, batch: int, pool: int, seed: int = 1):
  """`pool` random batches of `batch` rows for `task`, checked and on its devices."""
  from dlrm_jax.data import RandomData

  gen = RandomData(task.spec.table_rows, task.spec.num_dense, batch, seed,
                   hotness=task.run.data.hotness)
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
