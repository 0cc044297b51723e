"""Synthetic music-listening event logs in the schema of Yambda's flat files, with a
signal a sequence model can learn (for DLRMv4's tests and small configs).

Yambda (Yandex's music log, arXiv 2505.22238; MLPerf DLRMv4 trains on its 5B
version) stores one row per event in `flat/<size>/multi_event.parquet`: uid,
timestamp (seconds, in steps of 5), item_id, is_organic, event_type (listen,
like, dislike, unlike, undislike), played_ratio_pct and track_length_seconds
(listens only; null otherwise); `album_item_mapping.parquet` and
`artist_item_mapping.parquet` give each item's album and artist. `EventLog.write`
writes the same files, so that a preparation reads either the same way.

The hidden process. Items have latent factors built from their artist's, their
album's and their own, and a popularity (Zipf). Each user has a taste in the
same space that drifts from event to event (an AR(1) walk), so that what a user
played lately says more about the next play than the user's whole past does.
A listen is of an item the user picked by taste among candidates drawn by
popularity (organic), or of a popular item put in front of them (a
recommendation, `is_organic` 0). Its outcome, listen-plus (played >= 50%, the
label DLRMv4 predicts) or a skip, is a Bernoulli draw of

    p = sigmoid(affinity_scale * <taste, item> + quality_item)

so the best any model can do is the AUC of p itself (`best_auc`); an item's
popularity or its average outcome alone does worse (`popularity_auc`). Likes
follow some listen-plus events and dislikes some skips, as in Yambda.

Everything derives from `seed`: the same spec writes the same rows.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

EVENT_TYPES = ("listen", "like", "dislike", "unlike", "undislike")
TIME_STEP_S = 5  # Yambda's timestamps are seconds in steps of 5.
PLUS_PCT = 50  # listen-plus: played_ratio_pct >= 50 (Yambda's Listen+)
SESSION = 8  # listens per listening session, on average


def schema():
  """multi_event.parquet's columns and types, as Yambda's flat files have them."""
  import pyarrow as pa

  return pa.schema([
      ("uid", pa.uint32()), ("timestamp", pa.uint32()), ("item_id", pa.uint32()),
      ("is_organic", pa.uint8()), ("event_type", pa.dictionary(pa.int8(), pa.string())),
      ("played_ratio_pct", pa.uint16()), ("track_length_seconds", pa.uint32())])


@dataclasses.dataclass(frozen=True)
class EventLogSpec:
  """The sizes and the hidden process of a synthetic log (see the module docstring)."""

  num_users: int = 2_000
  num_items: int = 5_000
  num_artists: int = 300
  num_albums: int = 1_200
  listens_per_user: int = 150  # the mean; each user's count is drawn around it
  latent_dim: int = 16
  drift: float = 0.15  # the taste's change per event (AR(1) innovation's share)
  affinity_scale: float = 1.5  # of <taste, item> in the listen-plus logit
  choice_sharpness: float = 3.0  # how strongly organic picks follow the taste
  candidates: int = 32  # items an organic pick chooses among
  recommended_share: float = 0.3  # listens of items put in front of the user
  popularity_exponent: float = 1.1  # item popularity falls as rank^-exponent
  like_rate: float = 0.08  # of listen-plus events followed by a like
  dislike_rate: float = 0.03  # of skips followed by a dislike
  days: float = 60.0  # about how many days a user's listens span
  seed: int = 0

  def __post_init__(self):
    for name in ("num_users", "num_items", "num_artists", "num_albums", "listens_per_user",
                 "latent_dim", "candidates"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    for name in ("drift", "recommended_share", "like_rate", "dislike_rate"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
    if self.days <= 0:
      raise ValueError(f"days={self.days} must be > 0")


POPULARITY_PRIOR = 10.0  # listens of weight given to the overall listen-plus rate


def listen_plus_rates(items: np.ndarray, plus: np.ndarray, num_items: int) -> np.ndarray:
  """Each item's listen-plus rate over listens of `items` with outcomes `plus`, smoothed
  towards the overall rate by POPULARITY_PRIOR listens: the popularity baseline."""
  seen = np.bincount(items, minlength=num_items)
  overall = plus.mean() if len(plus) else 0.5
  return (np.bincount(items, plus, minlength=num_items) + POPULARITY_PRIOR * overall) / (
      seen + POPULARITY_PRIOR)


class EventLog:
  """A synthetic log: `events` (the rows, sorted by user then time, with the hidden
  listen-plus probability of each listen in `p_plus`), `albums` and `artists` (each
  item's), written as Yambda's files by `write`."""

  def __init__(self, spec: EventLogSpec = EventLogSpec()):
    self.spec = spec
    rng = np.random.default_rng([spec.seed, 1])
    k, n = spec.latent_dim, spec.num_items
    self.artists = rng.integers(0, spec.num_artists, n).astype(np.uint32)
    album_artist = rng.integers(0, spec.num_artists, spec.num_albums)
    # An item's album is one of its artist's (or any, where the artist has none).
    self.albums = np.empty(n, np.uint32)
    by_artist = {a: np.flatnonzero(album_artist == a) for a in range(spec.num_artists)}
    for i, a in enumerate(self.artists):
      own = by_artist[int(a)]
      self.albums[i] = own[rng.integers(len(own))] if len(own) else rng.integers(
          spec.num_albums)
    factors = (0.7 * rng.normal(size=(spec.num_artists, k))[self.artists]
               + 0.5 * rng.normal(size=(spec.num_albums, k))[self.albums]
               + 0.5 * rng.normal(size=(n, k)))
    self.item_factors = factors / np.linalg.norm(factors, axis=1, keepdims=True)
    rank = rng.permutation(n) + 1
    self.popularity = rank ** -spec.popularity_exponent
    self.popularity /= self.popularity.sum()
    self.quality = rng.normal(0.0, 0.5, n) - 0.2
    self.track_length = rng.integers(90, 420, n).astype(np.uint32)
    self.events = self._simulate(np.random.default_rng([spec.seed, 2]))

  def _simulate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every user's listens, in lockstep over users one listen at a time, then the
    likes and dislikes that follow some of them; sorted by user, time, event."""
    s, u, k = self.spec, self.spec.num_users, self.spec.latent_dim
    counts = np.maximum(1, rng.poisson(s.listens_per_user, u))
    taste = rng.normal(size=(u, k)) / np.sqrt(k)
    keep = np.sqrt(1.0 - s.drift ** 2)
    clock = rng.uniform(0.0, 7 * 86_400.0, u)  # each user's first event in the first week
    # Sessions: one listen in SESSION starts one, after a pause that spreads a user's
    # listens over the log's days.
    pause_mean = max(1.0, (s.days - 7) * 86_400.0 / s.listens_per_user * SESSION)
    rows = []
    for t in range(int(counts.max())):
      live = np.flatnonzero(counts > t)
      taste[live] = keep * taste[live] + s.drift * rng.normal(size=(len(live), k)) / np.sqrt(k)
      items, organic = self._pick(rng, taste[live])
      affinity = np.einsum("uk,uk->u", taste[live], self.item_factors[items]) * np.sqrt(k)
      p_plus = 1.0 / (1.0 + np.exp(-(s.affinity_scale * affinity + self.quality[items])))
      plus = rng.random(len(live)) < p_plus
      pct = np.where(plus, rng.integers(PLUS_PCT, 101, len(live)),
                     rng.integers(0, PLUS_PCT, len(live)))
      # A new session after an exponential pause (a few per day), else right after.
      pause = np.where(rng.random(len(live)) < 1 / SESSION,
                       rng.exponential(pause_mean, len(live)), 0.0)
      clock[live] += pause + self.track_length[items] * pct / 100.0
      rows.append((live, clock[live].copy(), items, organic, pct, p_plus, plus))
    return self._with_reactions(rng, rows)

  def _pick(self, rng: np.random.Generator, taste: np.ndarray):
    """Each user's next item: a recommendation (popular, is_organic 0) or an organic
    pick by taste among `candidates` popular items."""
    s, n = self.spec, len(taste)
    cand = rng.choice(s.num_items, size=(n, s.candidates), p=self.popularity)
    score = np.einsum("uk,uck->uc", taste, self.item_factors[cand]) * np.sqrt(s.latent_dim)
    gumbel = -np.log(-np.log(rng.random(score.shape)))
    chosen = cand[np.arange(n), np.argmax(s.choice_sharpness * score + gumbel, axis=1)]
    recommended = rng.random(n) < s.recommended_share
    items = np.where(recommended, cand[:, 0], chosen)
    return items, (~recommended).astype(np.uint8)

  def _with_reactions(self, rng: np.random.Generator, rows) -> dict[str, np.ndarray]:
    uid, clock, item, organic, pct, p_plus, plus = (np.concatenate(c) for c in zip(*rows))
    ts = (np.floor(clock / TIME_STEP_S) * TIME_STEP_S).astype(np.uint32)
    like = plus & (rng.random(len(plus)) < self.spec.like_rate)
    dislike = ~plus & (rng.random(len(plus)) < self.spec.dislike_rate)
    react = like | dislike
    n, m = len(uid), int(react.sum())
    out = {
        "uid": np.concatenate([uid, uid[react]]).astype(np.uint32),
        "timestamp": np.concatenate([ts, ts[react]]),
        "item_id": np.concatenate([item, item[react]]).astype(np.uint32),
        "is_organic": np.concatenate([organic, organic[react]]),
        "event_type": np.concatenate([np.zeros(n, np.int8),
                                      np.where(like[react], 1, 2).astype(np.int8)]),
        "played_ratio_pct": np.concatenate([pct, np.zeros(m, np.int64)]).astype(np.uint16),
        "track_length_seconds": np.concatenate([self.track_length[item], np.zeros(m, np.uint32)]),
        "p_plus": np.concatenate([p_plus, np.full(m, np.nan)]),
    }
    # A user's events in the order they happened: each reaction right after its listen.
    seq = np.concatenate([2 * np.arange(n), 2 * np.flatnonzero(react) + 1])
    order = np.lexsort((seq, out["uid"]))
    return {k: v[order] for k, v in out.items()}

  # What a model can reach -------------------------------------------------------------
  def listens(self, start_s: float = 0.0, end_s: float = np.inf) -> dict[str, np.ndarray]:
    """The listen events with start_s <= timestamp < end_s (the anchors DLRMv4 scores):
    their items, labels (listen-plus) and hidden probabilities."""
    e = self.events
    sel = (e["event_type"] == 0) & (e["timestamp"] >= start_s) & (e["timestamp"] < end_s)
    return {"uid": e["uid"][sel], "item_id": e["item_id"][sel], "timestamp": e["timestamp"][sel],
            "label": (e["played_ratio_pct"][sel] >= PLUS_PCT).astype(np.float32),
            "p_plus": e["p_plus"][sel]}

  def split_time(self, train_share: float = 0.9) -> float:
    """The timestamp before which `train_share` of the listens lie."""
    return float(np.quantile(self.listens()["timestamp"], train_share))

  def best_auc(self, start_s: float = 0.0, end_s: float = np.inf) -> float:
    """The AUC of the hidden probability on the listens in the window: the best any
    model can reach there."""
    from dlrm_jax.metrics import roc_auc

    w = self.listens(start_s, end_s)
    return roc_auc(w["label"], w["p_plus"])

  def popularity_auc(self, split_s: float) -> float:
    """The AUC after `split_s` of each item's listen-plus rate before it (smoothed
    towards the overall rate): what a model without the user's history reaches."""
    from dlrm_jax.metrics import roc_auc

    train, test = self.listens(end_s=split_s), self.listens(start_s=split_s)
    rate = listen_plus_rates(train["item_id"], train["label"], self.spec.num_items)
    return roc_auc(test["label"], rate[test["item_id"]])

  # Files --------------------------------------------------------------------------
  def table(self):
    """The events as a pyarrow Table in Yambda's schema (`schema()`): played_ratio_pct
    and track_length_seconds null for events other than listens."""
    import pyarrow as pa

    e = self.events
    listen = e["event_type"] == 0
    cols = {k: pa.array(e[k]) for k in ("uid", "timestamp", "item_id", "is_organic")}
    cols["event_type"] = pa.DictionaryArray.from_arrays(
        pa.array(e["event_type"]), pa.array(EVENT_TYPES))
    for k in ("played_ratio_pct", "track_length_seconds"):
      cols[k] = pa.array(e[k], mask=~listen)
    return pa.Table.from_pydict(cols, schema=schema())

  def write(self, root: str) -> None:
    """ROOT/flat/multi_event.parquet, ROOT/album_item_mapping.parquet and
    ROOT/artist_item_mapping.parquet, as Yambda lays its files out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(root, "flat"), exist_ok=True)
    pq.write_table(self.table(), os.path.join(root, "flat", "multi_event.parquet"))
    items = pa.array(np.arange(self.spec.num_items, dtype=np.uint32))
    for name, ids in (("album", self.albums), ("artist", self.artists)):
      pq.write_table(pa.table({"item_id": items, f"{name}_id": pa.array(ids)}),
                     os.path.join(root, f"{name}_item_mapping.parquet"))
