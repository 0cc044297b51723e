"""Models trained in PyTorch as dlrm_jax runs: the reference's `--save-model` files and
TorchRec `DLRM` / `DLRM_DCN` state_dicts.

    python -m dlrm_jax.from_torch --input model.pt --workdir DIR [--config CONFIG]
        [--config.KEY=VALUE ...]

writes DIR/checkpoints/0: the weights as a step-0 checkpoint of the config, with
its architecture (`arch_*`, `dcn_*`, `qr_*`, `md_*`, `data.num_dense_features`) read off the
weights (`dlrm_jax.reference.config_from_reference`,
`dlrm_jax.torchrec.config_from_torchrec`); the rest (data, optimisers, steps)
is the config's. `python -m dlrm_jax.predict --workdir DIR` scores with it,
`--export` exports it, and `python train.py --config CONFIG --workdir DIR`
with the architecture's fields as overrides (printed) trains on from it, with fresh
optimiser state.

The file is read with `torch.load(weights_only=True)`: no pickled code runs. A
`--save-model` file also holds numpy scalars and 0-d arrays (its accuracies
and losses), so exactly numpy's array, dtype and scalar reconstructors are
allowed besides torch's tensors. Needs torch (`pip install 'dlrm_jax[torch]'`;
the CPU build is enough). TorchRec's tables are taken in the order of the
number their names end in (t0, t1, ...; `--tables` names them otherwise); a
model trained with TorchRec's sharding must be saved with its tables gathered.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from typing import Mapping, Sequence

import numpy as np
from ml_collections import ConfigDict

from dlrm_jax import checkpoint as checkpoint_lib
from dlrm_jax.config import DEFAULT_CONFIG, ConfigError

FORMATS = ("reference", "torchrec")
# A key of each format's state_dict, after any prefix (DDP's "module.", TorchRec's
# training wrapper's "model.").
_MARKERS = {"reference": "bot_l.0.weight", "torchrec": "dense_arch.model._mlp.0._linear.weight"}


@dataclasses.dataclass
class TorchWeights:
  """A torch checkpoint's weights as numpy arrays, what they are and what came with them."""

  format: str  # "reference" | "torchrec"
  arrays: dict[str, np.ndarray]  # state-dict names, without `prefix`
  prefix: str  # what every name began with ("" | "module." | "model." ...)
  extras: dict  # a --save-model file's other entries that are numbers (iter, test_auc, ...)


def _numpy_globals() -> list:
  """What a pickled numpy scalar, dtype or array needs, and nothing more."""
  try:
    from numpy._core import multiarray  # numpy 2
  except ImportError:  # numpy 1
    from numpy.core import multiarray
  return [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
          *{type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int8, np.int16,
                                        np.int32, np.int64, np.uint8, np.bool_)}]


def load_torch(path: str) -> TorchWeights:
  """The weights of a reference `--save-model` file or a saved TorchRec state_dict."""
  try:
    import torch
  except ImportError:
    raise ImportError("reading torch files needs torch: pip install 'dlrm_jax[torch]'") from None
  with torch.serialization.safe_globals(_numpy_globals()):
    obj = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state_dict or the "
                     "reference's --save-model dict")
  extras = {}
  if isinstance(obj.get("state_dict"), Mapping):  # the reference's --save-model dict
    extras = {k: v.item() if hasattr(v, "item") else v for k, v in obj.items()
              if k not in ("state_dict", "opt_state_dict")
              and np.ndim(v) == 0 and isinstance(np.asarray(v).item(), (int, float))}
    obj = obj["state_dict"]
  tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
  for fmt, marker in _MARKERS.items():
    keys = [k for k in tensors if k == marker or k.endswith("." + marker)]
    if keys:
      prefix = keys[0][:-len(marker)]
      arrays = {k[len(prefix):]: tensors[k].detach().to(torch.float32).numpy()
                for k in tensors if k.startswith(prefix)}
      return TorchWeights(fmt, arrays, prefix, extras)
  raise ValueError(f"{path}: no {' or '.join(repr(m) for m in _MARKERS.values())} among its "
                   f"{len(tensors)} tensors: neither the reference's DLRM_Net nor TorchRec's "
                   f"DLRM / DLRM_DCN")


def architecture(weights: TorchWeights, config: ConfigDict,
                 tables: Sequence[str] | None = None) -> dict:
  """The config fields of the model the weights are of (`config`'s table sizes kept where
  the weights cannot tell them from those)."""
  if weights.format == "reference":
    from dlrm_jax.config import parse_widths
    from dlrm_jax.reference import config_from_reference
    return config_from_reference(weights.arrays, table_rows=parse_widths(
        "arch_embedding_size", config.arch_embedding_size))
  from dlrm_jax.torchrec import config_from_torchrec
  return config_from_torchrec(weights.arrays, tables=tables)


def fit_config(config: ConfigDict, fields: Mapping) -> tuple[ConfigDict, list[str]]:
  """A copy of `config` with `fields` set ("data.x" keys reach into sections), and
  "key: old -> new" for each field that changed."""
  config = config.copy_and_resolve_references()
  changes = []
  for key, value in fields.items():
    *path, name = key.split(".")
    section = config
    for part in path:
      section = section[part]
    if section[name] != value:
      changes.append(f"{key}: {section[name]!r} -> {value!r}")
      section[name] = value
  return config, changes


def write_run(config: ConfigDict, workdir: str, weights: TorchWeights,
              tables: Sequence[str] | None = None) -> int:
  """Writes the weights as step 0 of a run of `config` in `workdir`; returns the step."""
  from dlrm_jax import reference, torchrec
  from dlrm_jax.specs import RunSpec
  from dlrm_jax.task import Task

  import jax

  task = Task(config)
  if weights.format == "reference":
    params, out = reference.from_reference(task.spec, task.embedding, weights.arrays)
  else:
    params, out = torchrec.from_torchrec(task.spec, task.embedding, weights.arrays,
                                         tables=tables or torchrec.torchrec_table_names(
                                             weights.arrays))
  state = task.state_from(params, out)
  contents = checkpoint_lib.Contents(
      config=RunSpec.from_config(config).source, plan=task.plan,
      mesh={"shape": dict(task.mesh.shape), "processes": jax.process_count()})
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   async_save=False) as checkpointer:
    if checkpointer.steps():
      raise checkpoint_lib.CheckpointError(
          f"{workdir}/checkpoints already holds steps {checkpointer.steps()}: give a new "
          "--workdir")
    checkpointer.save(0, state, contents)
  return 0


def main(argv: Sequence[str]) -> None:
  from absl import flags

  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    weights = load_torch(f.input)
  except (ImportError, OSError, ValueError, pickle.UnpicklingError) as e:
    raise SystemExit(f"error: {e}") from None
  if f.format and f.format != weights.format:
    raise SystemExit(f"error: {f.input} holds {weights.format} weights, not {f.format}")
  tables = [t for t in f.tables.split(",") if t] or None
  fields = architecture(weights, _CONFIG.value, tables)
  config, changes = fit_config(_CONFIG.value, fields)
  print(f"{weights.format} weights from {f.input}"
        + (f" (names under {weights.prefix!r})" if weights.prefix else "")
        + (f"; it recorded {weights.extras}" if weights.extras else ""), file=sys.stderr)
  for change in changes:
    print(f"  from the weights: {change}", file=sys.stderr)
  if fields.get("qr_flag") and "qr_operation" not in fields:
    print(f"  quotient-remainder tables: qr_operation={config.qr_operation!r} from the config "
          "(mult and add have the same shapes)", file=sys.stderr)
  try:
    write_run(config, f.workdir, weights, tables)
  except (ConfigError, checkpoint_lib.CheckpointError, KeyError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  overrides = "".join(f" --config.{k}={v}" for k, v in fields.items())
  print(f"wrote {f.workdir}/checkpoints/0; python -m dlrm_jax.predict --workdir {f.workdir} "
        f"scores with it, and this trains on from it:\n  python train.py "
        f"--config {flags.FLAGS['config'].config_filename} --workdir {f.workdir}{overrides}",
        file=sys.stderr)


def _flags():
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_string("input", None, "the torch file: the reference's --save-model output, or "
                      "torch.save(model.state_dict()) of TorchRec's DLRM / DLRM_DCN",
                      required=True)
  flags.DEFINE_string("workdir", None, "the run directory to write (new)", required=True)
  flags.DEFINE_enum("format", "", ("",) + FORMATS, "what the file holds (default: detected)")
  flags.DEFINE_string("tables", "", "TorchRec: the embedding-bag names in table order, "
                      "comma-separated (default: by the number their names end in)")
  return config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG,
      "the config of the run (its architecture is set from the weights)", lock_config=False)


if __name__ == "__main__":
  from absl import app

  _CONFIG = _flags()
  app.run(main)
