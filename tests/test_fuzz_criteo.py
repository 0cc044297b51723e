"""The raw Criteo parser against README.md's grammar ("Criteo's raw format"), on
generated input (hypothesis).

`grammar_parse` below is a plain reading of that grammar, one character at a
time, written for these tests and not derived from the code. Every generated
input (good lines, and lines with random and non-UTF-8 bytes, NUL bytes, CRLF
and lone CRs, missing or extra TABs, empty lines, very long fields, huge and
negative integers, hex of other lengths, no final newline) must give its rows
and exactly its bad lines, with their numbers and fields: through
`parse_block`, through `prepare` (plain, in parallel pieces, .gz) and through
predict's raw-input reader. The searches are bounded and derandomized, so
every run tries the same inputs.
"""

import gzip
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dlrm_jax.data import criteo
from dlrm_jax.data import format as fmt

NUM_DENSE, NUM_SPARSE = 13, 26
DIGITS = "0123456789"
HEX = "0123456789abcdefABCDEF"
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


# The grammar, read literally --------------------------------------------------------

def is_integer(text: str) -> bool:
  digits = text[1:] if text.startswith("-") else text
  return len(digits) > 0 and all(c in DIGITS for c in digits)


def field_error(name: str, token: bytes):
  """None if `token` is a good value of field `name`, else that field's name."""
  try:
    text = token.decode("ascii")
  except UnicodeDecodeError:
    return name
  if name == "label":
    return None if text in ("0", "1") else name
  if name.startswith("I"):
    if text == "":
      return None
    if not is_integer(text):
      return name
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    digits = digits.lstrip("0") or "0"  # int() takes at most 4,300 digits
    ok = len(digits) <= 19 and INT64_MIN <= int(sign + digits) <= INT64_MAX
    return None if ok else name
  if text == "":
    return None
  return None if len(text) == 8 and all(c in HEX for c in text) else name


def grammar_parse(data: bytes, labelled: bool = True):
  """(rows, bad): rows (line, label, ints, cats) of the good lines, (line, field) of the
  bad ones. Missing values are 0; a file's last line may lack its LF; one CR at the end
  of a line is dropped."""
  names = (["label"] if labelled else []) + [f"I{j + 1}" for j in range(NUM_DENSE)] + [
      f"C{j + 1}" for j in range(NUM_SPARSE)]
  lines = data.split(b"\n")
  if lines[-1] == b"":
    lines.pop()  # what follows the last LF is no line
  rows, bad = [], []
  for number, line in enumerate(lines, start=1):
    if line.endswith(b"\r"):
      line = line[:-1]
    fields = line.split(b"\t")
    if len(fields) != len(names):
      bad.append((number, "columns"))
      continue
    errors = [field_error(n, t) for n, t in zip(names, fields)]
    errors = [e for e in errors if e is not None]
    if errors:
      bad.append((number, errors[0]))
      continue
    values = dict(zip(names, fields))
    label = int(values["label"]) if labelled else 0
    ints = [int(values[f"I{j + 1}"].lstrip(b"-").lstrip(b"0") or b"0")
            * (-1 if values[f"I{j + 1}"].startswith(b"-") else 1) for j in range(NUM_DENSE)]
    cats = [int(values[f"C{j + 1}"] or b"0", 16) for j in range(NUM_SPARSE)]
    rows.append((number, label, ints, cats))
  return rows, bad


def expected_dense(rows) -> np.ndarray:
  return np.array([[math.log1p(max(v, 0)) for v in r[2]] for r in rows],
                  np.float64).reshape(-1, NUM_DENSE).astype(np.float32)


# Generated input ----------------------------------------------------------------------

good_int = st.one_of(
    st.just(""), st.integers(0, 10**6).map(str), st.integers(-10**6, -1).map(str),
    st.sampled_from(["0", "-0", "007", "0" * 30 + "5", str(INT64_MAX), str(INT64_MIN),
                     "-" + "0" * 25 + "1"]),
    st.integers(INT64_MIN, INT64_MAX).map(str))
bad_int = st.sampled_from(["-", "--1", "1-", "+5", "1.5", "1e5", "ff", " 5", "0x10",
                           str(INT64_MAX + 1), str(INT64_MIN - 1), "9" * 40, "1 2"])
good_hex = st.one_of(st.just(""), st.text(HEX, min_size=8, max_size=8))
bad_hex = st.one_of(st.text(HEX, min_size=1, max_size=7), st.text(HEX, min_size=9, max_size=12),
                    st.sampled_from(["zz12ab34", "-1234567", "0x123456", "1234 678", "g" * 8]))
noise = st.one_of(
    st.binary(max_size=12), st.sampled_from([b"\x00", b"\xff\xfe", b"\xc3\xa9", b"\r", b" ",
                                             b"\x00\x01\xff garbage", b"\t", b"x" * 300]))


@st.composite
def good_fields(draw, labelled=True):
  fields = [draw(st.sampled_from(["0", "1"]))] if labelled else []
  fields += [draw(good_int) for _ in range(NUM_DENSE)]
  fields += [draw(good_hex) for _ in range(NUM_SPARSE)]
  return [f.encode() for f in fields]


@st.composite
def line(draw, labelled=True, clean=False):
  """One line without its end: good (often; always if `clean`), or broken in one of many
  ways."""
  fields = draw(good_fields(labelled))
  kind = "good" if clean else draw(st.sampled_from(
      ["good"] * 6 + ["int", "hex", "label", "noise", "tabs", "garbage", "empty", "long"]))
  i = draw(st.integers(0, len(fields) - 1))
  first_int = 1 if labelled else 0
  if kind == "int":
    fields[first_int + draw(st.integers(0, NUM_DENSE - 1))] = draw(bad_int).encode()
  elif kind == "hex":
    fields[-1 - draw(st.integers(0, NUM_SPARSE - 1))] = draw(bad_hex).encode()
  elif kind == "label" and labelled:
    fields[0] = draw(st.sampled_from([b"", b"2", b"01", b"-0", b"a", b"-1"]))
  elif kind == "noise":
    fields[i] = fields[i][:1] + draw(noise) + fields[i][1:]
  elif kind == "tabs":
    if draw(st.booleans()):
      del fields[i]
    else:
      fields.insert(i, draw(st.sampled_from([b"", b"1", b"0a0b0c0d"])))
  elif kind == "garbage":
    return draw(st.one_of(st.binary(max_size=60), st.just(b"\x00\x01\xff garbage")))
  elif kind == "empty":
    return b""
  elif kind == "long":
    fields[i] = draw(st.sampled_from([b"0" * 5000 + b"1", b"a" * 5000, b"1" * 5000]))
  return b"\t".join(fields)


@st.composite
def raw_file(draw, labelled=True, min_lines=1, max_lines=25):
  """Bytes of a raw file: lines with LF, CRLF or mixed ends, a final LF or not; a third
  of the files hold good lines only (the parser's fast path)."""
  clean = draw(st.integers(0, 2)) == 0
  lines = draw(st.lists(line(labelled, clean), min_size=min_lines, max_size=max_lines))
  ends = draw(st.sampled_from(["lf", "crlf", "mixed"]))
  out = b""
  for k, l in enumerate(lines):
    crlf = ends == "crlf" or (ends == "mixed" and draw(st.booleans()))
    out += l + (b"\r\n" if crlf else b"\n")
  if draw(st.booleans()):
    out = out[:-2] if out.endswith(b"\r\n") else out[:-1]  # no final line end
  return out


def check_block(block, rows, bad, skip):
  assert [(n, f) for n, f, _ in block.bad] == bad
  assert all("\n" not in m for _, _, m in block.bad)
  if bad and not skip:
    assert len(block.label) == 0
    return
  assert len(block.label) == len(rows)
  np.testing.assert_array_equal(block.label, [r[1] for r in rows])
  np.testing.assert_array_equal(block.raw.reshape(-1, NUM_SPARSE),
                                np.array([r[3] for r in rows], np.uint64).reshape(-1, NUM_SPARSE))
  np.testing.assert_array_max_ulp(block.dense.reshape(-1, NUM_DENSE), expected_dense(rows),
                                  maxulp=1)


# parse_block --------------------------------------------------------------------------

@settings(max_examples=200, **SETTINGS)
@given(data=raw_file(), skip=st.booleans())
def test_parse_block_follows_the_grammar(data, skip):
  rows, bad = grammar_parse(data)
  block = criteo.parse_block(data, skip_bad_lines=skip)
  assert block.lines == len(rows) + len(bad)
  check_block(block, rows, bad, skip)


@settings(max_examples=60, **SETTINGS)
@given(data=raw_file(labelled=False))
def test_parse_block_without_the_label_column_follows_the_grammar(data):
  rows, bad = grammar_parse(data, labelled=False)
  check_block(criteo.parse_block(data, skip_bad_lines=True, labelled=False), rows, bad, True)


def test_the_generated_inputs_cover_the_grammar():
  """The strategies above do produce each kind of line and of bad field."""
  seen_fields, seen_good, clean, cr = set(), 0, 0, 0

  @settings(max_examples=100, **SETTINGS)
  @given(data=raw_file())
  def collect(data):
    nonlocal seen_good, clean, cr
    rows, bad = grammar_parse(data)
    seen_fields.update(f[0] if f[0] in "IC" else f for _, f in bad)
    seen_good += len(rows)
    clean += len(rows) > 1 and not bad
    cr += b"\r\n" in data

  collect()
  assert seen_fields == {"columns", "label", "I", "C"}
  assert seen_good > 250 and clean > 10 and cr > 20, (seen_good, clean, cr)


# Through prepare ----------------------------------------------------------------------

MODULUS = 2**31 - 1


def prepared_rows(out):
  store = fmt.PreparedData(str(out))
  return store.read(0, store.num_rows)


@settings(max_examples=25, **SETTINGS)
@given(data=raw_file(min_lines=10, max_lines=60), how=st.sampled_from(["plain", "pieces", "gz"]),
       skip=st.booleans())
def test_prepare_follows_the_grammar(tmp_path_factory, data, how, skip):
  """Rows, bad lines (FILE:LINE: FIELD, raw line numbers, in pieces and .gz too) and
  their count: good + skipped = the file's lines."""
  tmp = tmp_path_factory.mktemp("fuzz")
  path = tmp / ("day.gz" if how == "gz" else "day.txt")
  path.write_bytes(gzip.compress(data) if how == "gz" else data)
  rows, bad = grammar_parse(data)
  kw = dict(categorical="hash", max_ind_range=MODULUS, skip_bad_lines=skip, workers=1,
            progress=False, log=lambda m: None, piece_bytes=300 if how == "pieces" else 1 << 26)
  if bad and not skip:
    with pytest.raises(criteo.BadLineError) as e:
      criteo.prepare("kaggle", [str(path)], str(tmp / "out"), **kw)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), *bad[0])
    return
  if not rows:
    with pytest.raises(criteo.InputError, match="no rows"):
      criteo.prepare("kaggle", [str(path)], str(tmp / "out"), **kw)
    return
  meta = criteo.prepare("kaggle", [str(path)], str(tmp / "out"), **kw)
  assert meta["rows"] == len(rows) and meta["bad_lines"] == len(bad)
  assert meta["rows"] + meta["bad_lines"] == meta["sources"][0]["lines"]
  assert [e.split(": ")[:2] for e in meta["bad_line_examples"]] == [
      [f"{path}:{n}", f] for n, f in bad[:20]]
  got = prepared_rows(tmp / "out")
  np.testing.assert_array_equal(got["label"], [r[1] for r in rows])
  np.testing.assert_array_equal(got["sparse"], np.array([r[3] for r in rows], np.int64) % MODULUS)
  np.testing.assert_array_max_ulp(got["dense"], expected_dense(rows), maxulp=1)


def test_truncated_gz_is_an_input_error_whatever_the_cut(tmp_path):
  data = b"".join(b"\t".join([b"1"] + [b"%d" % (i * j) for j in range(13)]
                             + [b"%08x" % (i * 7919 + j) for j in range(26)]) + b"\n"
                  for i in range(400))
  whole = gzip.compress(data)
  for cut in np.linspace(20, len(whole) - 10, 6).astype(int):
    path = tmp_path / f"cut{cut}.gz"
    path.write_bytes(whole[:cut])
    with pytest.raises(criteo.InputError, match=f"cut{cut}.gz: truncated gzip file"):
      criteo.prepare("kaggle", [str(path)], str(tmp_path / f"o{cut}"), categorical="hash",
                     max_ind_range=10, skip_bad_lines=True, workers=1, progress=False,
                     log=lambda m: None)
