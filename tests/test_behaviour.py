"""Behaviour recorded before the package's restructuring (tests/behaviour_record.py; the
metrics recorded again when evaluations came to cover the whole split and records to
carry `eval_rows`, the checkpoint and its predictions kept from then):
a checkpoint written then still restores and predicts the same, and the tiny Criteo
run still gives the same metrics. `python tests/behaviour_record.py compare
tests/data/behaviour` checks the same bit for bit (and `python train.py` too); here
a tolerance allows for another CPU's float rounding."""

import json
import os
import shutil

import numpy as np
import pytest

import behaviour_record
from conftest import REPO
from dlrm_jax import trainer

RECORDED = os.path.join(REPO, "tests", "data", "behaviour")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return behaviour_record.prepare_data(str(tmp_path_factory.mktemp("data")))


def test_the_recorded_checkpoint_restores_and_predicts_as_it_did(data, tmp_path):
  raw, prepared = data
  run = tmp_path / "run"
  shutil.copytree(os.path.join(RECORDED, "criteo_run"), run)
  got = behaviour_record.predict_rows(str(run), raw, prepared, str(tmp_path / "p.txt"))
  want = np.loadtxt(os.path.join(RECORDED, "predictions.txt"), dtype=np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_the_tiny_criteo_run_gives_the_recorded_metrics(data, tmp_path):
  _, prepared = data
  result = trainer.train_and_evaluate(behaviour_record.criteo_config(prepared),
                                      str(tmp_path / "run"))
  with open(os.path.join(RECORDED, "criteo_metrics.jsonl")) as f:
    want = [json.loads(line) for line in f]
  got = [{k: v for k, v in r.items() if k not in trainer.TIMINGS} for r in result.records]
  assert [sorted(r) for r in got] == [sorted(r) for r in want]
  for g, w in zip(got, want, strict=True):
    for key, value in w.items():
      assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
