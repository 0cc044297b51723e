"""DLRMv4's host-side sample builder: `PreparedEvents.samples` time per batch.

    python benchmarks/dlrmv4_samples.py [--batch 1024] [--repeat 5] [--dir DIR]

Two synthetic logs (dlrm_jax.data.event_log), written in Yambda's layout and
prepared with `--min-history 64` into DIR (a temporary directory unless given;
a given DIR keeps them for the next run):

- `default`: EventLogSpec() (2,000 users, about 150 listens each), at the
  reference's history length and scan window (4086, 20000) and at small ones
  (64, 256);
- `long`: 40 users with about 12,000 listens each, at the reference's lengths,
  where histories reach the 5b log's lengths (about 2,700 events).

For each, `samples` of --batch anchors drawn at random from all the anchors
(sorted; each in its own scan window, the most work), then of the first batch
of the window with the most anchors (`batch`, the training order: a few users'
consecutive listens, whose scan windows overlap). The best of --repeat runs,
in milliseconds, with the mean history length. The time includes the output's
[batch, history_length] arrays (about 88 MB at the reference's length).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from dlrm_jax.data import anchors as anchors_lib
from dlrm_jax.data import yambda
from dlrm_jax.data.event_log import EventLog, EventLogSpec

LOGS = {"default": EventLogSpec(),
        "long": EventLogSpec(num_users=40, listens_per_user=12_000)}
CASES = (("default", 4086, 20_000), ("default", 64, 256), ("long", 4086, 20_000))


def prepared(root: str, name: str) -> anchors_lib.PreparedEvents:
  raw, out = os.path.join(root, name, "raw"), os.path.join(root, name, "prepared")
  if not os.path.exists(os.path.join(out, "metadata.json")):
    EventLog(LOGS[name]).write(raw)
    yambda.prepare(raw, out, min_history=64, log=lambda s: None)
  return anchors_lib.PreparedEvents(out)


def best_ms(run, repeat: int) -> float:
  times = []
  for _ in range(repeat):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--repeat", type=int, default=5)
  parser.add_argument("--dir", default=None, help="where the logs are kept (default: a "
                      "temporary directory)")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    root = args.dir or tmp
    print(f"{'log':8} {'L':>5} {'scan':>6} {'anchors':8} {'history':>8} {'ms':>8}")
    for name, length, scan in CASES:
      events = prepared(root, name)
      rng = np.random.default_rng(0)
      window = int(np.argmax(events.metadata["anchors_per_window"]))
      for kind, anchors in (
          ("random", np.sort(rng.choice(events.anchors, args.batch, replace=False))),
          ("window", anchors_lib.window_batch_anchors(events.window_anchors(window), args.batch,
                                                 0))):
        def run():
          return events.samples(anchors, history_length=length, scan_window=scan)
        mean = run()["history_length"].mean()
        print(f"{name:8} {length:>5} {scan:>6} {kind:8} {mean:>8.0f} "
              f"{best_ms(run, args.repeat):>8.1f}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
