"""Saving replicated arrays on several devices: Orbax's replica-parallel split against
one replica writing each array whole (what dlrm_jax.checkpoint does).

Six small replicated float32 arrays on N simulated CPU devices, saved once by
an Orbax CheckpointManager with a PyTreeCheckpointHandler whose jax.Array
handler has `use_replica_parallel` on or off; prints the XLA compiles and the
wall time of the save (write included). Each setting runs in its own
subprocess with no compilation cache, so both start cold.

  python benchmarks/checkpoint_replicated.py --devices 4
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time


def save_once(replica_parallel: bool, directory: str) -> None:
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = Mesh(np.array(jax.devices()), ("x",))
  replicated = NamedSharding(mesh, PartitionSpec())
  tree = {f"w{i}": jax.device_put(np.ones((8 * i + 8,), np.float32), replicated)
          for i in range(6)}
  compiles = [0]
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.__setitem__(0, compiles[0] + 1)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=replica_parallel)))
  manager = ocp.CheckpointManager(directory, item_names=("state",), item_handlers={
      "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry)})
  t = time.perf_counter()
  manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
  manager.wait_until_finished()
  print(f"use_replica_parallel={replica_parallel}: {compiles[0]} compiles, "
        f"{time.perf_counter() - t:.2f} s", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--devices", type=int, default=4)
  p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
  p.add_argument("--dir", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    save_once(a.child == "on", a.dir)
    return
  print(f"# {os.uname().machine} cores={os.cpu_count()} {time.strftime('%Y-%m-%d %H:%M %Z')} "
        f"devices={a.devices}", flush=True)
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={a.devices}",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR="")
  with tempfile.TemporaryDirectory() as tmp:
    for setting in ("on", "off"):
      subprocess.run([sys.executable, __file__, "--child", setting,
                      "--dir", os.path.join(tmp, setting)], env=env, check=True)


if __name__ == "__main__":
  main()
