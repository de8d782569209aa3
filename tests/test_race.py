"""benchmarks/race.py: `--compare` names every ratio that fell by more than 10%, nothing else;
`--rounds` pools the processes of each side."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _race():
  spec = importlib.util.spec_from_file_location("race", os.path.join(ROOT, "benchmarks", "race.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules["race"] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def _results(path, training, decoding):
  rows = ["## Training steps", "", "| model | cell | trainable | jft tok/s | peer tok/s | ratio | x |", "|---|---|"]
  rows += [f"| small | {cell} | 1 | 1 | 1 | {ratio:.2f} | 1 |" for cell, ratio in training.items()]
  rows += ["", "## Greedy decoding, 32-token prompts", "", "| model | batch | jft | peer | ratio | s |", "|---|"]
  rows += [f"| small | {batch} | 1 | 1 | {ratio:.2f} | 1 |" for batch, ratio in decoding.items()]
  path.write_text("\n".join(rows) + "\n")
  return str(path)


def test_compare_flags_only_ratios_that_fell_by_more_than_ten_percent(tmp_path):
  race = _race()
  old = _results(tmp_path / "old.md", {"full": 1.00, "lora-all": 1.20, "ia3": 0.90}, {1: 1.30, 8: 1.10})
  new = _results(tmp_path / "new.md", {"full": 0.95, "lora-all": 1.00, "ia3": 0.99}, {1: 1.00, 8: 1.05})
  assert race.parse_ratios(old)[("small", "lora-all")] == 1.20
  assert race.parse_ratios(old)[("small", "generate b8")] == 1.10
  worse = race.compare(race.parse_ratios(old), race.parse_ratios(new))
  assert len(worse) == 2, worse
  assert worse[0].startswith("small generate b1: ratio 1.30 -> 1.00") and worse[1].startswith("small lora-all")


def test_rounds_pool_every_timed_step_and_the_highest_rss():
  race = _race()
  a = {"times": [2.0, 2.2], "rss_mib": 100.0, "compile_s": 3.0, "loss0": 10.5, "trainable": 7}
  b = {"times": [2.4], "rss_mib": 120.0, "compile_s": 5.0, "loss0": 10.5, "trainable": 7}
  got = race.pooled([a, b])
  assert got["times"] == [2.0, 2.2, 2.4] and got["rss_mib"] == 120.0 and got["compile_s"] == 4.0
  assert got["trainable"] == 7 and got["loss0"] == 10.5
  assert race.pooled([a, {"error": "killed"}]) == {"error": "killed"}  # a failed process is reported, not hidden
