"""Row-wise int8 and int4 tables for inference: table bytes and the AUC change.

    python benchmarks/quantized_tables.py [--kaggle ../shared/data/criteo/kaggle_train_head10k.tsv]

Trains two models, then scores each one's evaluation rows with float32 tables and
with its tables quantised (`dlrm_jax.embedding.quantized`, as `python -m
dlrm_jax.predict --quantize` does):

- Kaggle: configs/criteo_kaggle.py (the reference's Kaggle settings: D=16, SGD lr
  0.1, batch 128) for one epoch of the real rows given (prepared here in the
  reference's categorical mode), scored on their test split;
- synthetic: configs/default.py (200 steps on synthetic_ctr), scored on its held-out
  evaluation set (16,384 rows).

Bytes: the quantised tables' bytes against float32's, measured at D=16 (the Kaggle
model's) and D=128 (a random 100,000 x 128 table).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

import common


def aucs(model, batches) -> dict:
  from dlrm_jax import predict
  from dlrm_jax.metrics import roc_auc

  batches = list(batches)
  labels = np.concatenate([b["label"] for b in batches])
  size = max(len(b["dense"]) for b in batches)
  out = {"rows": int(len(labels)),
         "float32": roc_auc(labels, predict.score(model, iter(batches), size))}
  for fmt in ("int8", "int4"):
    out[fmt] = roc_auc(labels, predict.score_quantized(model, iter(batches), size, fmt))
    out[f"{fmt}_delta"] = out[fmt] - out["float32"]
  return out


def trained(config, workdir):
  from dlrm_jax import predict, trainer

  config.checkpoint.enabled = False
  config.progress_bar = False
  result = trainer.train_and_evaluate(config, workdir)
  return predict.Model(task=result.task, params=result.state.params,
                       tables=result.state.tables, config=config, step=0), result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kaggle", default=common.KAGGLE_HEAD)
  args = parser.parse_args()
  from dlrm_jax import predict
  from dlrm_jax.data import criteo, make_data
  from dlrm_jax.embedding import quantized
  from dlrm_jax.specs import RunSpec

  work = tempfile.mkdtemp()
  results = {}
  # Bytes per table at D=16 and D=128.
  rng = np.random.default_rng(0)
  for dim in (16, 128):
    table = rng.normal(size=(100_000, dim)).astype(np.float32)
    sizes = {fmt: sum(v.nbytes for v in quantized.quantize(table, fmt).values())
             for fmt in quantized.FORMATS}
    results[f"bytes_D{dim}"] = {"float32": table.nbytes, **sizes,
                                **{f"float32_over_{f}": table.nbytes / n
                                   for f, n in sizes.items()}}
  # Kaggle rows, the reference's Kaggle settings, one epoch.
  prepared = os.path.join(work, "kaggle")
  criteo.prepare("kaggle", [args.kaggle], prepared, workers=1, progress=False,
                 log=lambda m: None)
  c = common.load_config("criteo_kaggle", eval_every_epochs=0.0, test_num_batches=0)
  c.data.path = prepared
  model, run = trained(c, os.path.join(work, "run_kaggle"))
  results["kaggle"] = aucs(model, predict.prepared_batches(prepared, 4096, "test"))
  results["kaggle"]["steps"] = run.summary["steps"]
  # Synthetic data: the default config, its held-out evaluation set.
  d = common.load_config("default")
  model, _ = trained(d, os.path.join(work, "run_default"))
  source = make_data(RunSpec.from_config(d))
  batches = [source.batch(i, "eval", d.test_mini_batch_size) for i in range(d.test_num_batches)]
  results["synthetic"] = aucs(model, batches)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
