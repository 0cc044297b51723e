"""Mixed-dimension tables: a narrower table for each larger feature, projected to D.

The mixed-dimension embeddings of Ginart et al. (2021), the reference's
`--md-flag`, `--md-temperature`, `--md-round-dims` and `--md-threshold`: table f of
n_f rows gets d_f columns by a power law over the table sizes, and its looked-up
vector a learned projection [d_f, D] (no bias; a dense parameter of the model,
`dlrm_jax.model.Projection`) back to the width D that the interaction takes.

The rule (the reference's `md_solver` with a base dimension): with n_min the
smallest table's rows and alpha the temperature,

    d_f = round(max(1, D * (n_min / n_f) ** alpha)),   the smallest table: D,

rounded to the nearest power of two (2 ** round(log2 d_f)) with `md_round_dims`;
alpha = 0 keeps every table at D. Tables of at most `md_threshold` rows keep D
(and no projection): the reference crashes on them (it hands the whole list of
widths to a plain table). `md_dims` gives the widths explicitly instead.

Tables of one width are stacked and sharded together: the planner places every
table as usual, `dlrm_jax.embedding.layouts.plan_groups` makes one stacked array
per sharding type and width (keys `table_wise`, `table_wise_d4`, ...; D's keep the
plain name), and the exchange hands the model [B, F, W] vectors, each narrow
table's zero-padded to W, which the projection reads the first d_f columns of. W
is the widest table's width (`EmbeddingCollection.dim`): D whenever a table keeps
D, as the rule's smallest table always does; with `md_dims` all below D it is the
widest of them (which is then projected too, and the exchange moves W, not D,
values a vector).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from dlrm_jax.config import ConfigError, parse_widths


def md_solver(rows: Sequence[int], temperature: float, dim: int,
              round_dims: bool = False) -> list[int]:
  """Each table's width by the power-law rule above (tables in their own order), in
  float32 and in the order the reference computes it: lambda = D n_min ** alpha, then
  lambda n ** -alpha. (Its pow is torch's, whose last bit can differ from numpy's, so a
  width can still differ where d lies within a float32 ulp of a half: 8 in 60 million
  random tables, against 40 for the rule in float64; `benchmarks/md_rule_parity.py`.
  `md_dims` fixes the widths exactly, and a model loaded from PyTorch takes them from
  its arrays' shapes.)"""
  n = np.asarray(rows, np.int64).astype(np.float32)
  if n.size == 0:
    return []
  alpha = np.float32(temperature)
  lamb = np.float32(dim) * np.power(n.min(), alpha)
  d = np.maximum(np.float32(1), lamb * np.power(n, -alpha))
  d = np.round(d)
  if round_dims:
    d = np.float32(2) ** np.round(np.log2(d))
  d[np.argmin(n)] = dim  # the smallest table: the base width, exactly
  return [int(min(dim, v)) for v in d]


def table_dims(rows: Sequence[int], dim: int, *, enabled: bool = False,
               temperature: float = 0.3, round_dims: bool = False, threshold: int = 200,
               explicit: Sequence[int] = ()) -> tuple[int, ...]:
  """The widths of the tables: D each without `enabled`; `explicit` if given; else the
  rule, with tables of at most `threshold` rows at D."""
  if not enabled:
    return tuple(int(dim) for _ in rows)
  if explicit:
    if len(explicit) != len(rows):
      raise ConfigError(f"md_dims gives {len(explicit)} widths for {len(rows)} tables")
    bad = [d for d in explicit if not 1 <= d <= dim]
    if bad:
      raise ConfigError(f"md_dims {bad} must be in [1, arch_sparse_feature_size={dim}]")
    return tuple(int(d) for d in explicit)
  solved = md_solver(rows, temperature, dim, round_dims)
  return tuple(int(dim) if n <= threshold else d for n, d in zip(rows, solved))


def dims_from_config(config) -> tuple[int, ...]:
  """The table widths of a config (a ConfigDict or its JSON; fields it lacks: defaults)."""
  get = lambda key, default: config[key] if key in config else default
  rows = parse_widths("arch_embedding_size", config["arch_embedding_size"])
  explicit = get("md_dims", "")
  return table_dims(rows, int(config["arch_sparse_feature_size"]),
                    enabled=bool(get("md_flag", False)),
                    temperature=float(get("md_temperature", 0.3)),
                    round_dims=bool(get("md_round_dims", False)),
                    threshold=int(get("md_threshold", 200)),
                    explicit=parse_widths("md_dims", explicit) if explicit else ())


_SUFFIX = re.compile(r"^(.*)_d(\d+)$")


def width_key(name: str, width: int, base: int) -> str:
  """The key of a stacked array of `width`-wide tables: `name` for the base width D,
  `name_dW` for a narrower one."""
  return name if width == base else f"{name}_d{width}"


def split_width_key(key: str, base: int) -> tuple[str, int]:
  """The inverse of `width_key`: (name, width)."""
  m = _SUFFIX.match(key)
  return (m.group(1), int(m.group(2))) if m else (key, base)
