"""What the code does, recorded once and compared after a change that must not alter it.

    python tests/behaviour_record.py write DIR     # record into DIR
    python tests/behaviour_record.py compare DIR   # run again, compare bit for bit with DIR

Records, each from a fresh run:
- `default_metrics.jsonl`: `python train.py` on the default config, one device;
- `criteo_metrics.jsonl`: a tiny model trained 12 steps on a prepared synthetic
  Criteo directory (hash mode), evaluated at steps 6 and 12;
- `criteo_run/checkpoints/12`: that run's last checkpoint;
- `predictions.txt`: `python -m dlrm_jax.predict` of that checkpoint on the
  first 50 raw rows.
The timings (`examples_per_sec`, `seconds`) are left out of the metrics. `compare` prints
one line per record and exits 1 if any differs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RAW_ROWS, PREDICT_ROWS, SEED = 400, 50, 0
TIMINGS = ("examples_per_sec", "seconds")  # dlrm_jax.trainer.TIMINGS; older trees lack it


def _records(path: str) -> list[dict]:
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


def _write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, "w") as f:
    f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)


def prepare_data(work: str) -> tuple[str, str]:
  """The raw file and its prepared (hash mode) directory, made afresh under `work`."""
  from dlrm_jax.data import criteo
  from dlrm_jax.data.criteo_synth import write_raw

  os.makedirs(work, exist_ok=True)
  raw = os.path.join(work, "train.txt")
  write_raw(raw, RAW_ROWS, seed=SEED)
  prepared = os.path.join(work, "prepared")
  criteo.prepare("kaggle", [raw], prepared, categorical="hash", max_ind_range=997, workers=1,
                 progress=False, log=lambda m: None)
  return raw, prepared


def criteo_config(prepared: str):
  """The tiny Criteo run: 12 steps of 32, evaluations and checkpoints at 6 and 12."""
  sys.path.insert(0, HERE)
  from conftest import small_criteo_config

  c = small_criteo_config(prepared)
  c.embedding_optimizer, c.dense_optimizer = "rowwise_adagrad", "adagrad"
  c.num_batches, c.test_freq = 12, 6
  c.checkpoint.enabled, c.checkpoint.max_to_keep, c.checkpoint.keep_best = True, 1, False
  c.checkpoint.async_save = False
  return c


def predict_rows(workdir: str, raw: str, prepared: str, out: str) -> np.ndarray:
  """predict.main on the first PREDICT_ROWS raw rows, one device."""
  from dlrm_jax import predict

  head = out + ".input.tsv"
  with open(raw) as f, open(head, "w") as g:
    g.writelines(line for _, line in zip(range(PREDICT_ROWS), f))
  code = predict.main(["--workdir", workdir, "--input", head, "--output", out,
                       "--data", prepared, "--devices", "1", "--batch-size", "16"])
  if code != 0:
    raise RuntimeError(f"predict exited {code}")
  return np.loadtxt(out, dtype=np.float64)


def record(work: str) -> dict:
  """Runs everything in `work`: {name: path of what it wrote}."""
  from dlrm_jax import trainer

  env = dict(os.environ, XLA_FLAGS="")
  subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                  f"--workdir={os.path.join(work, 'default')}"],
                 check=True, env=env, cwd=REPO, capture_output=True)
  out = {"default_metrics.jsonl": os.path.join(work, "default", "metrics.jsonl")}
  raw, prepared = prepare_data(work)
  run = os.path.join(work, "criteo_run")
  trainer.train_and_evaluate(criteo_config(prepared), run)
  out["criteo_metrics.jsonl"] = os.path.join(run, "metrics.jsonl")
  predict_rows(run, raw, prepared, os.path.join(work, "predictions.txt"))
  out["predictions.txt"] = os.path.join(work, "predictions.txt")
  out["criteo_run"] = run
  return out


def write(directory: str) -> None:
  with tempfile.TemporaryDirectory() as work:
    got = record(work)
    os.makedirs(directory, exist_ok=True)
    for name in ("default_metrics.jsonl", "criteo_metrics.jsonl"):
      _write_jsonl(os.path.join(directory, name), _records(got[name]))
    shutil.copy(got["predictions.txt"], os.path.join(directory, "predictions.txt"))
    dest = os.path.join(directory, "criteo_run", "checkpoints")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(os.path.join(got["criteo_run"], "checkpoints"), dest)


def compare(directory: str) -> int:
  bad = 0
  with tempfile.TemporaryDirectory() as work:
    got = record(work)
    for name in ("default_metrics.jsonl", "criteo_metrics.jsonl"):
      want = _records(os.path.join(directory, name))
      same = _records(got[name]) == want
      bad += not same
      print(f"{name}: {'equal' if same else 'DIFFERENT'} ({len(want)} records)")
    want = np.loadtxt(os.path.join(directory, "predictions.txt"), dtype=np.float64)
    mine = np.loadtxt(got["predictions.txt"], dtype=np.float64)
    same = mine.shape == want.shape and bool(np.all(mine == want))
    bad += not same
    print(f"predictions.txt: {'equal' if same else 'DIFFERENT'} ({len(want)} rows)")
    # The committed checkpoint, restored by this code, predicts what it predicted.
    run = os.path.join(work, "committed_run")
    shutil.copytree(os.path.join(directory, "criteo_run"), run)
    raw, prepared = prepare_data(os.path.join(work, "again"))
    restored = predict_rows(run, raw, prepared, os.path.join(work, "restored.txt"))
    same = bool(np.all(restored == want))
    bad += not same
    print(f"committed checkpoint restored: predictions {'equal' if same else 'DIFFERENT'}")
  return 1 if bad else 0


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[0] not in ("write", "compare"):
    print(__doc__)
    return 2
  sys.path.insert(0, REPO)
  if argv[0] == "write":
    write(argv[1])
    return 0
  return compare(argv[1])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
