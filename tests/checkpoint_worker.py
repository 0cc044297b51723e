"""A training run that SIGKILLs itself mid-run (tests/test_checkpoint.py).

    python tests/checkpoint_worker.py WORKDIR KILL_AT

Trains `resume_config()` in WORKDIR and kills its own process with SIGKILL
when the data loader is asked for train batch KILL_AT (the prefetcher reads
two ahead, so a step or two earlier, possibly while a checkpoint is being
written).
"""

import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from conftest import load_config  # noqa: E402  (also sets the simulated devices)


def resume_config():
  """A tiny run with checkpoints every 5 steps and evaluations every 10."""
  c = load_config("tiny")
  c.num_batches = 20
  c.test_freq = 10
  c.checkpoint.enabled = True
  c.checkpoint.every_steps = 5
  c.checkpoint.max_to_keep = 2
  c.embedding_optimizer = "rowwise_adagrad"
  c.dense_optimizer = "adagrad"
  return c


def run_interrupted_then_resumed(config, workdir, monkeypatch, fail_at=14):
  """Trains `config` (checkpoints on) in `workdir` until a failure injected when train
  batch `fail_at` is read, then reruns it there: the resumed run's result."""
  from dlrm_jax import trainer

  def fail(i, batch):
    if i == fail_at:
      raise RuntimeError("injected")
    return batch

  config.checkpoint.enabled = True
  make_data = trainer.make_data
  monkeypatch.setattr(trainer, "make_data", lambda run: Injected(make_data(run), fail))
  try:
    trainer.train_and_evaluate(config, workdir)
  except RuntimeError as e:
    assert str(e) == "injected", e
  else:
    raise AssertionError(f"the run did not reach batch {fail_at}")
  monkeypatch.setattr(trainer, "make_data", make_data)
  return trainer.train_and_evaluate(config, workdir)


class Injected:
  """Wraps a data source: `hook(index, batch)` sees each train batch as it is read."""

  def __init__(self, data, hook):
    self._data, self._hook = data, hook

  def __getattr__(self, name):
    return getattr(self._data, name)

  def batches(self, start=0, split="train", batch_size=None):
    return _InjectedStream(self._data.batches(start, split, batch_size), start, self._hook)


class _InjectedStream:
  """A `BatchStream` whose batches go through `hook`, with the wrapped stream's data
  position."""

  def __init__(self, stream, start, hook):
    self._stream, self._index, self._hook = stream, start, hook

  def state_at(self, position):
    return self._stream.state_at(position)

  def restore(self, state):
    self._stream.restore(state)
    self._index = int(state["position"])

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._stream)
    self._index += 1
    return self._hook(self._index - 1, batch)


def inject(hook):
  """Makes the trainer's data sources pass their train batches through `hook`."""
  from dlrm_jax import trainer

  make_data = trainer.make_data
  trainer.make_data = lambda run: Injected(make_data(run), hook)


def main(workdir: str, kill_at: int) -> None:
  from dlrm_jax import trainer

  def hook(i, batch):
    if i == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return batch

  inject(hook)
  trainer.train_and_evaluate(resume_config(), workdir)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
