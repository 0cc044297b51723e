"""Mixed-dimension tables (`md_*`): table bytes and AUC against every table at D.

    python benchmarks/mixed_dims.py [--kaggle ../shared/data/criteo/kaggle_train_head10k.tsv]

Three comparisons, each with and without mixed dimensions:

- Kaggle: the rows given, prepared in the reference's categorical mode (each table
  its own vocabulary), one epoch of a small model (D=8, bottom 13-32-8, top 32-16-1,
  Adagrad, batch 128: tests/test_mixed.py's), `md_flag` with threshold 200 and the
  reference's temperature 0.3; AUC on the test split;
- synthetic: configs/default.py (200 steps on synthetic_ctr, D=16) with the widths
  16-8-4-2 repeated over its 26 tables (`md_dims`); AUC on its held-out set;
- plan: the Kaggle-sized tables of configs/criteo_kaggle.py planned over 8 devices
  (global batch 2048) with and without `md_flag`: bytes per device, tables and
  optimiser state.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import common


def kaggle(path: str, work: str) -> dict:
  from dlrm_jax import trainer
  from dlrm_jax.data import criteo

  prepared = os.path.join(work, "kaggle")
  criteo.prepare("kaggle", [path], prepared, categorical="reference", workers=1,
                 progress=False, log=lambda m: None)
  out = {}
  for md in (False, True):
    c = common.load_config(
        "criteo_kaggle", arch_sparse_feature_size=8, arch_mlp_bot="13-32-8",
        arch_mlp_top="32-16-1", dense_optimizer="adagrad",
        embedding_optimizer="rowwise_adagrad", learning_rate=0.05, mini_batch_size=128,
        num_batches=67, test_freq=0, eval_every_epochs=0.0, test_mini_batch_size=352, test_num_batches=0,
        progress_bar=False, md_flag=md, md_threshold=200)
    c.data.path = prepared
    c.mesh.num_devices = 1
    c.checkpoint.enabled = False
    result = trainer.train_and_evaluate(c, os.path.join(work, f"kaggle_md{int(md)}"))
    out["md" if md else "plain"] = {"auc": result.summary["auc"],
                                    "table_bytes": result.task.collection.nbytes,
                                    "dims": list(result.task.spec.dims)}
  out["table_bytes_ratio"] = out["plain"]["table_bytes"] / out["md"]["table_bytes"]
  return out


def synthetic(work: str) -> dict:
  from dlrm_jax import trainer

  out = {}
  widths = "-".join(["16", "8", "4", "2"] * 6 + ["16", "8"])
  for md in (False, True):
    c = common.load_config("default", progress_bar=False, md_flag=md,
                           md_dims=widths if md else "")
    c.checkpoint.enabled = False
    result = trainer.train_and_evaluate(c, os.path.join(work, f"synthetic_md{int(md)}"))
    out["md" if md else "plain"] = {"auc": result.summary["auc"],
                                    "table_bytes": result.task.collection.nbytes}
  return out


def plan() -> dict:
  from dlrm_jax.embedding import EmbeddingCollection
  from dlrm_jax.embedding.qr import QRTables
  from dlrm_jax.specs import RunSpec
  from dlrm_jax.task import make_plan

  out = {}
  for md in (False, True):
    c = common.load_config("criteo_kaggle", mini_batch_size=2048, md_flag=md)
    collection = EmbeddingCollection(QRTables.from_config(c).table_specs())
    per_device = make_plan(RunSpec.from_config(c), collection, 8).device_bytes()
    out["md" if md else "plain"] = {"max_device_mib": max(per_device) / 2**20,
                                    "widths": len(collection.widths)}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kaggle", default=common.KAGGLE_HEAD)
  args = parser.parse_args()
  work = tempfile.mkdtemp()
  results = {"kaggle": kaggle(args.kaggle, work), "synthetic": synthetic(work), "plan": plan()}
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
