"""One process of a multi-process training run on localhost (see test_multiprocess.py).

Usage: python multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID WORKDIR [STEPS]
Set XLA_FLAGS=--xla_force_host_platform_device_count=N for N devices per process.
A WORKDIR with checkpoints resumes from the latest; STEPS (default: the
config's) is where the run ends. With CRITEO_DATA=DIR in the environment it
trains `criteo_config(DIR)` instead (each process reads its own rows); with
DLRMV4_LOG=DIR, test_dlrmv4_train's tiny DLRMv4 on the synthetic log in DIR.
"""

import faulthandler
import os
import signal
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(port: str, num_processes: str, process_id: str, workdir: str, steps: str = ""):
  faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's view of a hang
  from dlrm_jax import trainer
  from test_multiprocess import criteo_config, make_config

  data, log = os.environ.get("CRITEO_DATA"), os.environ.get("DLRMV4_LOG")
  if log:
    from test_dlrmv4_train import tiny_config

    c = tiny_config(log, devices=0)
  else:
    c = criteo_config(data) if data else make_config()
  c.distributed.coordinator_address = f"127.0.0.1:{port}"
  c.distributed.num_processes = int(num_processes)
  c.distributed.process_id = int(process_id)
  if steps:
    c.num_batches = int(steps)
  result = trainer.train_and_evaluate(c, workdir, log=lambda s: print(s, flush=True))
  tables = result.task.embedding.to_arrays(result.state.tables)  # a collective: every process
  if int(process_id) == 0:
    np.savez(os.path.join(workdir, "tables.npz"), *tables)
  from dlrm_jax import parallel

  parallel.exit_without_teardown()  # as train.py does


if __name__ == "__main__":
  main(*sys.argv[1:])
