"""Deliberate breakages of the package, each run against the tests that must catch it.

    python tests/mutations.py [--only NAME[,NAME...]] [--list] [--keep]

For each mutation below: the repository's package, tests and configs are
copied into a temporary directory (with shared/ beside it, as here), one
piece of code is replaced, and the mutation's tests run there from the
default set (`-m 'not slow'`). A mutation is killed when a test fails. It
survives when every test passes, and it is an error when its target text is
not found exactly once (the code moved: update the mutation, never count it
killed) or when pytest selects no test or stops for another reason. The
unmutated copy runs the same tests first: they must pass, or a kill would
mean nothing.

Prints a table of the outcomes and exits 0 only when every mutation is
killed. `tests/test_mutations.py` (slow set) runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("src", "tests", "configs", "train.py", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  what: str
  path: str  # relative to the repository
  old: str  # must occur exactly once in the file
  new: str
  tests: tuple[str, ...]  # pytest node ids that must catch it


MUTATIONS = (
    Mutation(
        "sparse_update_noop", "the sparse optimiser never changes a table row",
        "src/dlrm_jax/embedding/sharded.py",
        '    """Step 3: each device applies `opt` to the touched rows of its own shards."""\n',
        '    """Step 3: each device applies `opt` to the touched rows of its own shards."""\n'
        "    return tables, state\n",
        ("tests/test_train.py::test_training_learns_from_the_ids_alone",
         "tests/test_criteo_train.py::test_training_on_real_kaggle_rows_learns")),
    Mutation(
        "lr_schedule_ignored", "the train step trains at the first step's rate at every step",
        "src/dlrm_jax/functional.py",
        "    lr = self.schedule(state.step)\n",
        "    lr = self.schedule(state.step * 0)\n",
        ("tests/test_train.py::test_sparse_sgd_step_equals_dense_optax_sgd",
         "tests/test_train.py::test_cli_end_to_end_on_tiny")),
    Mutation(
        "dot_pairs_reordered", "the dot interaction's pairs in column-major order",
        "src/dlrm_jax/model.py",
        "pairs = [(i, j) for i in range(num_vectors) for j in range(i + offset)]",
        "pairs = [(i, j) for j in range(num_vectors) for i in range(j + 1 - offset, num_vectors)]",
        ("tests/test_model.py::test_dot_interaction_pair_order",
         "tests/test_parity.py::test_initial_predictions_match_reference")),
    Mutation(
        "eval_skips_last_batch", "evaluation leaves out its last batch",
        "src/dlrm_jax/evaluation.py",
        "  for batch in batches:\n    inputs = ",
        "  for batch in list(batches)[:-1]:\n    inputs = ",
        ("tests/test_train.py::test_evaluate_covers_every_batch",)),
    Mutation(
        "eval_counts_padding", "evaluation counts a padded batch's filler rows",
        "src/dlrm_jax/evaluation.py",
        "  out[MASK] = np.arange(rows) < n\n",
        "  out[MASK] = np.ones(rows, bool)\n",
        ("tests/test_train.py::test_evaluate_covers_every_batch",)),
    Mutation(
        "scan_runs_never_restart", "the GPU kernel's segmented scan sums across rows",
        "src/dlrm_jax/embedding/optimizers.py",
        "    return a[0] | b[0], jnp.where(b[0][:, None], b[1], a[1] + b[1])\n",
        "    return a[0] | b[0], a[1] + b[1]\n",
        ("tests/test_embedding.py::test_sum_duplicates",)),
    Mutation(
        "ids_unchecked_in_loop", "the training loop does not check the ids of its batches",
        "src/dlrm_jax/trainer.py",
        '    task.check_ids(batch["sparse"], batch.get("sparse_mask"))\n',
        "    pass\n",
        ("tests/test_train.py::test_the_training_loop_checks_ids",)),
    Mutation(
        "row_wise_exchange_transposed",
        "row-wise partial sums scattered sample-major instead of device-major",
        "src/dlrm_jax/embedding/layouts.py",
        "    summed = self.kernel.sum_scatter(partial, self.axes.shard, self.n)\n",
        "    partial = partial.reshape(self.n, -1, *partial.shape[1:]).swapaxes(0, 1).reshape(\n"
        "        partial.shape)\n"
        "    summed = self.kernel.sum_scatter(partial, self.axes.shard, self.n)\n",
        ("tests/test_sharding.py::test_each_sharding_type_alone_matches_single_device_sgd",)),
    Mutation(
        "row_wise_empty_slots_not_zeroed",
        "a row-wise device's empty slots add their clipped rows to the last bag (TPU)",
        "src/dlrm_jax/embedding/layouts.py",
        "  return jnp.where(kept[:, None], vectors, 0)\n",
        "  return vectors\n",
        ("tests/test_sharding.py::test_the_tpu_kernel_exchanges_row_wise_sums_by_all_to_all",)),
    Mutation(
        "row_wise_table_gradient_unmasked",
        "a lookup differentiated with respect to the tables passes the empty slots' gradient",
        "src/dlrm_jax/embedding/layouts.py",
        "      values = jnp.where(lookup[\"kept\"][:, None], vectors, 0)\n",
        "      values = _zero_where_not_kept(vectors, lookup[\"kept\"])\n",
        ("tests/test_train.py::test_sparse_sgd_step_equals_dense_optax_sgd",)),
    Mutation(
        "tpu_sum_scatter_blocks_transposed",
        "the TPU kernel sends each device every n-th sample instead of its block",
        "src/dlrm_jax/embedding/kernels.py",
        "  blocks = partial.reshape(n, partial.shape[0] // n, *partial.shape[1:])\n",
        "  blocks = partial.reshape(partial.shape[0] // n, n, *partial.shape[1:]).swapaxes(0, 1)\n",
        ("tests/test_sharding.py::test_the_tpu_kernel_exchanges_row_wise_sums_by_all_to_all",)),
    Mutation(
        "fusion_reads_once",
        "a fusion's parameter counts once per output element, however many paths read it",
        "src/dlrm_jax/traffic.py",
        "        read[name] += made\n",
        "        read[name] = max(read[name], made)\n",
        ("tests/test_traffic.py::test_a_fusion_reads_of_its_parameters_what_its_outputs_need",)),
    Mutation(
        "reduce_reads_one_element",
        "a reduction in a fusion reads one element of its input per element it makes",
        "src/dlrm_jax/traffic.py",
        "        read[name] += made * size / max(1, _elements(ins.shape))\n",
        "        read[name] += made\n",
        ("tests/test_traffic.py::test_a_fusion_reads_of_its_parameters_what_its_outputs_need",)),
    Mutation(
        "flat_mean_not_divided", "mean tables of flat bags pool to the sum of their ids",
        "src/dlrm_jax/embedding/sharded.py",
        "        emb = emb / jnp.asarray(bags.divisors, emb.dtype)[None, :, None]\n",
        "        pass\n",
        ("tests/test_sharding.py::test_flat_bags_step_as_padded_bags_with_a_mask[mixed]",)),
    Mutation(
        "duplicates_not_summed", "Adagrad and Adam update a repeated row once per lookup",
        "src/dlrm_jax/embedding/optimizers.py",
        "    unique, g = sum_duplicates(rows, grads, tables[\"stacked\"].shape[0])\n",
        "    unique, g = rows, grads\n",
        ("tests/test_embedding.py::test_optimizer_matches_numpy_with_duplicates",)),
    Mutation(
        "column_slices_own_accumulators",
        "row-wise Adagrad on a column-wise table: each device's slice keeps its own mean",
        "src/dlrm_jax/embedding/optimizers.py",
        "      mean_square = jax.lax.pmean(mean_square, column_axis)\n",
        "      pass\n",
        ("tests/test_sharding.py::test_mixed_plan_bags_rowwise_adagrad_match_single_device",)),
    Mutation(
        "resume_ignores_data_position",
        "a resumed run does not check the saved data position against the loader's order",
        "src/dlrm_jax/trainer.py",
        "      stream.restore(position)\n",
        "      pass\n",
        ("tests/test_checkpoint.py::"
         "test_interrupted_criteo_run_resumes_to_the_uninterrupted_result",)),
    Mutation(
        "best_forgotten_on_reopen", "checkpoint metrics are not written, so a resumed run "
        "forgets which step was best",
        "src/dlrm_jax/checkpoint.py",
        '    best = {"best_fn": lambda m: m["auc"], "best_mode": "max"} if keep_best else {}\n',
        "    best = {}\n",
        ("tests/test_checkpoint.py::test_keep_best_keeps_the_best_auc_of_a_reopened_directory",)),
    Mutation(
        "unseen_values_not_counted", "predict maps unseen raw values to row 0 without "
        "counting them",
        "src/dlrm_jax/predict.py",
        '      self.unseen += int((~found).sum()) if self.mode == "reference" else 0\n',
        "      pass\n",
        ("tests/test_predict.py::"
         "test_unseen_values_map_to_row_0_are_counted_and_scored_as_row_0",)),
    Mutation(
        "md_projection_skipped", "mixed-dimension tables' vectors reach the interaction "
        "zero-padded, never projected",
        "src/dlrm_jax/model.py",
        "      emb = self.projection(emb)\n",
        "      pass\n",
        ("tests/test_from_torch.py::test_reference_mixed_dimension_tables_load",)),
    Mutation(
        "md_widths_out_of_order", "a lookup of tables of several widths returns the features "
        "grouped by width, not in order",
        "src/dlrm_jax/embedding/collection.py",
        "    return take_static(jnp.concatenate(parts, axis=1), np.argsort(order), axis=1)\n",
        "    return jnp.concatenate(parts, axis=1)\n",
        ("tests/test_mixed.py::test_mixed_lookup_against_numpy",)),
    Mutation(
        "md_small_tables_narrowed", "tables at or below md_threshold get the rule's width too",
        "src/dlrm_jax/embedding/mixed.py",
        "  return tuple(int(dim) if n <= threshold else d for n, d in zip(rows, solved))\n",
        "  return tuple(solved)\n",
        ("tests/test_mixed.py::test_small_tables_keep_d_and_explicit_widths",)),
    Mutation(
        "row_wise_drops_uncounted", "row-wise ids past a device's capacity are dropped silently",
        "src/dlrm_jax/embedding/layouts.py",
        "  return at, jnp.maximum(count[-1] - capacity, 0)\n",
        "  return at, jnp.int32(0)\n",
        ("tests/test_sharding.py::test_row_wise_ids_past_capacity_are_counted",
         "tests/test_sharding.py::"
         "test_a_train_step_past_the_row_wise_capacity_stops_the_run_before_any_checkpoint")),
    Mutation(
        "replicas_update_own_ids_only",
        "each copy of a replicated table applies only its own device's touched rows",
        "src/dlrm_jax/embedding/layouts.py",
        "      rows = jax.lax.all_gather(rows, self.axes.batch, tiled=True)\n"
        "      grads = jax.lax.all_gather(grads, self.axes.batch, tiled=True)\n",
        "",
        ("tests/test_sharding.py::"
         "test_replicated_copies_stay_bit_identical_and_equal_one_device",)),
)


class TargetNotFound(RuntimeError):
  pass


def _copy_repo(root: str) -> str:
  """The files the tests need, under root/<repo name>, with shared/ beside it."""
  dest = os.path.join(root, os.path.basename(REPO))
  os.makedirs(dest)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
  for name in COPIED:
    src = os.path.join(REPO, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dest, name), ignore=ignore)
    else:
      shutil.copy2(src, dest)
  shared = os.path.join(os.path.dirname(REPO), "shared")
  if os.path.isdir(shared):
    os.symlink(shared, os.path.join(root, "shared"))
  return dest


def _apply(copy: str, m: Mutation) -> None:
  path = os.path.join(copy, m.path)
  with open(path) as f:
    text = f.read()
  count = text.count(m.old)
  if count != 1:
    raise TargetNotFound(f"{m.path}: the target text occurs {count} times, not once")
  with open(path, "w") as f:
    f.write(text.replace(m.old, m.new))


def _pytest(copy: str, tests: tuple[str, ...]) -> tuple[int, list[str], str]:
  """Runs `tests` in the copy: (pytest's exit code, the failed node ids, the output's tail)."""
  env = dict(os.environ, PYTHONPATH=os.path.join(copy, "src"), PYTHONDONTWRITEBYTECODE="1")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
      cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
  failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
  return proc.returncode, failed, (proc.stdout + proc.stderr)[-2000:]


def _check_imports_come_from(copy: str) -> None:
  env = dict(os.environ, PYTHONPATH=os.path.join(copy, "src"))
  where = subprocess.run([sys.executable, "-c", "import dlrm_jax; print(dlrm_jax.__file__)"],
                         cwd=copy, env=env, capture_output=True, text=True, check=True).stdout
  if not where.strip().startswith(copy):
    raise RuntimeError(f"dlrm_jax imports from {where.strip()}, not from the copy {copy}")


def run(mutations, keep: bool = False) -> list[dict]:
  """Each mutation's outcome: killed, survived or error, with the tests that failed."""
  root = tempfile.mkdtemp(prefix="dlrm_jax_mutations_")
  results = []
  try:
    clean = _copy_repo(os.path.join(root, "clean"))
    _check_imports_come_from(clean)
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    code, failed, tail = _pytest(clean, tests)
    if code != 0:
      raise RuntimeError(f"the unmutated tests do not pass (pytest exit {code}, failed "
                         f"{failed}):\n{tail}")
    for i, m in enumerate(mutations):
      start = time.perf_counter()
      copy = _copy_repo(os.path.join(root, f"m{i}"))
      try:
        _apply(copy, m)
      except TargetNotFound as e:
        results.append({"name": m.name, "outcome": "error", "detail": str(e), "seconds": 0.0})
        continue
      code, failed, tail = _pytest(copy, m.tests)
      if code == 1:
        outcome, detail = "killed", ", ".join(t.split("::")[-1] for t in failed)
      elif code == 0:
        outcome, detail = "survived", "every test passed"
      else:
        outcome, detail = "error", f"pytest exit {code}: {tail.strip().splitlines()[-1]}"
      results.append({"name": m.name, "outcome": outcome, "detail": detail,
                      "seconds": time.perf_counter() - start})
      print(f"{m.name}: {outcome} ({detail})", flush=True)
      if not keep:
        shutil.rmtree(os.path.dirname(copy))
  finally:
    if not keep:
      shutil.rmtree(root, ignore_errors=True)
    else:
      print(f"copies kept in {root}")
  return results


def table(results: list[dict]) -> str:
  lines = ["| mutation | outcome | caught by | seconds |", "|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['name']} | {r['outcome']} | {r['detail']} | {r['seconds']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="", help="comma-separated mutation names")
  p.add_argument("--list", action="store_true", help="list the mutations and exit")
  p.add_argument("--keep", action="store_true", help="keep the mutated copies")
  args = p.parse_args(argv)
  if args.list:
    for m in MUTATIONS:
      print(f"{m.name}: {m.what} ({m.path}; {', '.join(m.tests)})")
    return 0
  chosen = MUTATIONS
  if args.only:
    names = args.only.split(",")
    unknown = set(names) - {m.name for m in MUTATIONS}
    if unknown:
      p.error(f"unknown mutations {sorted(unknown)}")
    chosen = tuple(m for m in MUTATIONS if m.name in names)
  results = run(chosen, keep=args.keep)
  print(table(results))
  killed = sum(r["outcome"] == "killed" for r in results)
  print(f"{killed} of {len(results)} mutations killed")
  return 0 if killed == len(results) else 1


if __name__ == "__main__":
  sys.exit(main())
