"""A fuzz suite (Hypothesis): config overrides, data files and run-folder files, generated or damaged at random.

The property everywhere: the input ends in success or in exactly one named error (a `JftError` whose
message names the file or field), never another exception, and the input file is never changed. The
default suite runs a fixed example budget (well under 60 s together); `slow` runs about three times it.
"""

import json
import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jft import config as cfg
from jft import data, run
from jft.core import files
from jft.data import preference as preference_data
from jft.studies import report, sweep
from jft.core import errors
from jft.core.errors import JftError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

# Each test's example budget in the default suite; JFT_FUZZ_EXAMPLES sets one for all (the slow test's
# larger run). Derandomized, so a failure in CI reproduces here.
BUDGET = int(os.environ.get("JFT_FUZZ_EXAMPLES", "0")) or None


def budget(default: int):
  return settings(max_examples=BUDGET or default, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))


def _unchanged(path: str, before: bytes):
  with open(path, "rb") as f:
    assert f.read() == before, f"{path} was changed"


def _named(e: JftError, *names: str):
  """A named error: one line that says which file or field."""
  text = str(e)
  assert text and "\n" not in text.strip(), text
  assert any(n in text for n in names), f"{text!r} names none of {names}"


# ---------------------------------------------------------------------------- config overrides

FIELDS = sorted(cfg.flat_keys(cfg.load_config(TINY)))
NEAR = [f[:-1] for f in FIELDS[::7]] + [f + "s" for f in FIELDS[::11]] + [f.upper() for f in FIELDS[::13]]
VALUES = st.one_of(st.sampled_from(["0", "-1", "1e9", "nan", "inf", "-inf", "true", "None", "", "[]", "{}", "(1,)",
                                    "lora", "qlora", "2:4", "1e-3", "abc", "0.5", "-0.0", "3", "(('a', 1),)"]),
                   st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True).map(repr),
                   st.text(string.printable, max_size=12))


@given(st.lists(st.tuples(st.sampled_from(FIELDS + NEAR) | st.text("abcdefghijklmnopqrstuvwxyz._", min_size=1,
                                                                      max_size=20), VALUES), max_size=4))
@budget(150)
def test_config_overrides_end_in_a_config_or_one_named_error(overrides):
  try:
    cfg.build(TINY, [("model.name", "/nowhere/model"), *overrides])
  except JftError as e:
    _named(e, *[k for k, _ in overrides], "model.name", "config")


# ---------------------------------------------------------------------------- data files

ROW_VALUES = st.one_of(st.text(max_size=8), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                       st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                  st.text(max_size=3), max_size=2))
ROWS = st.lists(st.dictionaries(st.sampled_from(["text", "label", "prompt", "response", "instruction", "input",
                                                 "output", "chosen", "rejected", "conversations", "x"]),
                                ROW_VALUES | st.sampled_from(["positive", "negative"]), max_size=5),
                min_size=0, max_size=4)


def _damaged(raw: bytes, how: int, junk: bytes) -> bytes:
  """One of: as is, cut short, random bytes inserted, a non-UTF-8 byte, an empty line, a huge line."""
  if how == 1:
    return raw[:len(raw) // 2]
  if how == 2:
    return raw[:len(raw) // 3] + junk + raw[len(raw) // 3:]
  if how == 3:
    return raw + b"\xff\xfe\n"
  if how == 4:
    return b"\n" + raw + b"\n\n"
  if how == 5:
    return raw + b'{"text": "' + b"x" * 200_000 + b'", "label": "positive"}\n'
  return raw


def _encode(rows: list, kind: str, encoding: str) -> bytes:
  if kind == "jsonl":
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  elif kind == "json":
    text = json.dumps(rows, ensure_ascii=False)
  else:
    sep = "," if kind == "csv" else "\t"
    text = "text" + sep + "label\n" + "".join(f"{r.get('text', '')}{sep}{r.get('label', '')}\n" for r in rows)
  return text.encode(encoding, errors="replace")


DATA = st.tuples(ROWS, st.sampled_from(["jsonl", "json", "csv", "tsv"]), st.sampled_from(["utf-8", "latin-1",
                                                                                          "utf-16"]),
                 st.integers(0, 5), st.binary(max_size=16))


@given(DATA)
@budget(25)
def test_classification_data_files_end_in_examples_or_one_named_error(tmp_path_factory, case):
  """`datasets` reads the file after jft's checks: whatever it holds, the end is examples or a DataError."""
  rows, kind, encoding, how, junk = case
  folder = tmp_path_factory.mktemp("data")
  path = os.path.join(folder, f"train.{kind}")
  raw = _damaged(_encode(rows, kind, encoding), how, junk)
  with open(path, "wb") as f:
    f.write(raw)
  try:
    dataset = data.load_split(str(folder), "train")
    data.classification_examples(dataset, None, text_field="text", label_field="label",
                                 labels=("positive", "negative"), template="{text}", chat=False)
  except JftError as e:
    _named(e, path, "row", "label", "text")
  _unchanged(path, raw)


@given(DATA, st.sampled_from(["instruction", "preference", "unpaired"]))
@budget(120)
def test_instruction_and_preference_files_end_in_examples_or_one_named_error(tmp_path_factory, case, layout):
  rows, kind, encoding, how, junk = case
  kind = kind if kind in ("json", "jsonl") else "jsonl"
  path = os.path.join(tmp_path_factory.mktemp("pref"), f"rows.{kind}")
  raw = _damaged(_encode(rows, kind, encoding), how, junk)
  with open(path, "wb") as f:
    f.write(raw)
  try:
    loaded = preference_data.load_json_rows(path)
    if layout == "instruction":
      preference_data.instruction_examples(loaded, None, where=path)
    elif layout == "preference":
      preference_data.preference_examples(loaded, None, chat=False, where=path)
    else:
      preference_data.unpaired_examples(loaded, None, chat=False, where=path)
  except JftError as e:
    _named(e, path)
  _unchanged(path, raw)


# ---------------------------------------------------------------------------- run-folder files, damaged


def _damage_file(raw: bytes, how: int, junk: bytes, at: int) -> bytes:
  at = at % (len(raw) + 1)
  return [raw, raw[:at], raw[:at] + junk + raw[at:], b"", b"{}", b"[]", b"null", junk,
          raw.replace(b'"', b"", 1), raw[:at] + b"\xff" + raw[at:]][how]


DAMAGE = st.tuples(st.integers(0, 9), st.binary(max_size=24), st.integers(0, 10**6))


@pytest.fixture(scope="module")
def run_files():
  """A run folder's and a sweep folder's JSON files as jft writes them (no training needed)."""
  config = cfg.build(TINY, [("model.name", "/nowhere/model")])
  sweep_record = {"config": TINY, "overrides": [], "search": "grid", "trials": 0, "seed": 0, "metric": "accuracy",
                  "direction": "maximize", "keys": ["optim.lr"], "log_keys": ["optim.lr"],
                  "points": [{"optim.lr": 0.1}]}
  point = {"index": 0, "name": "000-a", "values": {"optim.lr": 0.1}, "status": "done", "attempts": 1, "failures": 0,
           "config": TINY, "overrides": []}
  metrics = "".join(json.dumps({"step": s, "kind": "train", "time": 1.0 + s, "loss": 2.0 / s}) + "\n"
                    for s in range(1, 5))
  metrics += json.dumps({"step": 4, "kind": "eval", "time": 9.0, "loss": 0.5, "accuracy": 0.7}) + "\n"
  return {"config.json": json.dumps(config.to_dict(), indent=2).encode(), "sweep.json": json.dumps(sweep_record).encode(),
          "point.json": json.dumps(point).encode(), "metrics.jsonl": metrics.encode()}


def _write(path: str, raw: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(raw)


@given(st.sampled_from(["config.json", "metrics.jsonl", "sweep.json", "point.json"]), DAMAGE)
@budget(80)
def test_damaged_run_files_end_in_a_result_or_one_named_error(tmp_path_factory, run_files, name, damage):
  """Each file as `eval`/`--resume` (config.json), `jft report` (metrics.jsonl, sweep.json, point.json)
  read it; a damaged metrics line is left out with a warning, never a reason to stop."""
  root = str(tmp_path_factory.mktemp("damaged"))
  study, point_dir = os.path.join(root, "study"), os.path.join(root, "study", "points", "000-a")
  raw = _damage_file(run_files[name], *damage)
  targets = {"config.json": os.path.join(root, "run", "config.json"), "metrics.jsonl": os.path.join(point_dir,
                                                                                                    "metrics.jsonl"),
             "sweep.json": os.path.join(study, sweep.SWEEP_FILE), "point.json": os.path.join(point_dir,
                                                                                            sweep.POINT_FILE)}
  for other, path in targets.items():
    _write(path, raw if other == name else run_files[other])
  _write(os.path.join(point_dir, "config.json"), run_files["config.json"])
  try:
    if name == "config.json":
      run.read_config(os.path.join(root, "run"), report=lambda line: None)
    else:
      report.report(study)
  except JftError as e:
    _named(e, targets[name], name)
  _unchanged(targets[name], raw)


@pytest.fixture(scope="module")
def saved_step(tmp_path_factory):
  """A checkpoint folder with steps 1 and 2 (tiny arrays), and the bytes of step 2's files."""
  import jax.numpy as jnp

  from jft.run import checkpoint

  folder = str(tmp_path_factory.mktemp("ckpt"))
  mngr = checkpoint.manager(folder, None)
  for step in (1, 2):
    mngr.save(step, {"trainable": {"a": jnp.full((8,), float(step))}}, {"data": {"pos": step}, "step": step})
  step_dir = os.path.join(folder, "checkpoints", "2")
  names = sorted(os.path.relpath(os.path.join(d, f), step_dir) for d, _, fs in os.walk(step_dir) for f in fs)
  return folder, {n: open(os.path.join(step_dir, n), "rb").read() for n in names}


@given(st.data(), DAMAGE)
@budget(30)
def test_a_damaged_checkpoint_file_falls_back_or_is_one_named_error(saved_step, data_, damage):
  """Any file of the newest step damaged at random: the newest step if its damage changed nothing it
  reads, else step 1, named; or, for orbax metadata that orbax cannot open the folder with at all, one
  named error (`jft train --resume` moves that step aside: tests/test_checkpoint_faults.py); never
  another exception."""
  import jax.numpy as jnp

  from jft.run import checkpoint

  folder, originals = saved_step
  name = data_.draw(st.sampled_from(sorted(originals)))
  path = os.path.join(folder, "checkpoints", "2", name)
  _write(path, _damage_file(originals[name], *damage))
  try:
    lines = []
    step, state, meta = checkpoint.manager(folder, None).restore(
        checkpoint.abstract({"trainable": {"a": jnp.zeros((8,))}}), report=lines.append)
    assert float(state["trainable"]["a"][0]) == step and meta["data"] == {"pos": step}
    assert step == 2 or any("checkpoints/2 is" in line for line in lines), lines
  except errors.CorruptCheckpointError as e:
    _named(e, f"checkpoints/2: {name} is damaged")
  finally:
    _write(path, originals[name])


@given(st.lists(st.one_of(st.binary(max_size=40), st.dictionaries(st.sampled_from(["step", "kind", "loss"]),
                                                                  ROW_VALUES, max_size=3).map(
                                                                      lambda d: json.dumps(d).encode())),
                max_size=6))
@budget(150)
def test_metric_records_are_whole_or_left_out(tmp_path_factory, lines):
  path = os.path.join(tmp_path_factory.mktemp("metrics"), "metrics.jsonl")
  raw = b"\n".join(lines)
  _write(path, raw)
  warnings = []
  records = files.read_records(path, warn=warnings.append)
  assert all(isinstance(r["step"], int) and isinstance(r["kind"], str) for r in records)
  assert len(warnings) <= 1 and all(path in w for w in warnings)
  _unchanged(path, raw)


@pytest.mark.slow
def test_the_fuzz_suite_with_a_larger_budget():
  """The same properties with 300 examples each, about three times the default suite's 555 in all
  (JFT_FUZZ_EXAMPLES in a subprocess)."""
  import subprocess
  import sys

  p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not slow"],
                     capture_output=True, text=True, cwd=ROOT, timeout=1500, env={**os.environ,
                                                                                  "JFT_FUZZ_EXAMPLES": "300"})
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
