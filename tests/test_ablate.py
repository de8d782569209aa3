"""`jft ablate`: removing the method from every layer is the base model, rank truncation at the trained
rank is the run, errors are one line and write nothing; one tiny LoRA run serves every test."""

import contextlib
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest

from jft.studies import ablate
from jft import cli, config as cfg
from jft.run.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
QUIET = [("data.test_split", "")]  # no test evaluation: these runs only need checkpoints


def _train(tiny_model, workdir, spec, hparams=None):
  c = cfg.build(TINY + spec, [("model.name", tiny_model)] + QUIET)
  if hparams is not None:
    with c.unlocked():
      c.method.hparams = hparams
  train(c, workdir, echo=lambda *_: None)
  return workdir


def _snapshot(folder):
  return {os.path.relpath(os.path.join(d, f), folder): os.path.getmtime(os.path.join(d, f))
          for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
  """A 4-step LoRA run (q_proj, v_proj, rank 4); its zero-shot numbers are on validation, first 8 examples."""
  return _train(tiny_model, str(tmp_path_factory.mktemp("ablate") / "lora"), ":steps=4")


@pytest.fixture(scope="module")
def ablated(lora_run):
  """`jft ablate --kind all` on the LoRA run (default --out RUN/ablations): (exit code, stdout, stderr, rows, before)."""
  before = _snapshot(lora_run)
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(["ablate", "--workdir", lora_run, "--kind", "all", "--split", "validation", "--limit", "8"])
  with open(os.path.join(lora_run, "ablations", "ablations.csv")) as f:
    rows = {(r["ablation"], r["metric"]): r for r in csv.DictReader(f)}
  return code, out.getvalue(), err.getvalue(), rows, before


def _value(rows, ablation, metric):
  return float(rows[ablation, metric]["value"])


def test_cli_writes_the_table_and_plots_and_leaves_the_run_alone(ablated, lora_run):
  code, out, err, rows, before = ablated
  assert code == 0
  labels = list(dict.fromkeys(a for a, _ in rows))
  assert labels == ["none", "layer 0", "layer 1", "all layers", "module q_proj", "module v_proj",
                    "rank 1", "rank 2", "rank 4"]
  assert {m for _, m in rows} == {"accuracy", "loss"}
  assert rows["module q_proj", "loss"]["leaves"] == "lora/a, lora/b of q_proj"
  assert float(rows["none", "loss"]["change"]) == 0.0
  assert np.isclose(float(rows["layer 0", "loss"]["change"]),
                    _value(rows, "layer 0", "loss") - _value(rows, "none", "loss"), atol=1e-9)
  folder = os.path.join(lora_run, "ablations")
  assert sorted(os.listdir(folder)) == ["ablations.csv", "ablations.md", "layers.png", "modules.png", "rank.png"]
  assert out.startswith("| kind | ablation | metric | value | change | leaves |") and "| rank | rank 2 | loss |" in out
  assert err.strip() == "jft ablate: tokens does not apply to lora (no virtual tokens); skipped"
  after = _snapshot(lora_run)
  assert {p: t for p, t in after.items() if not p.startswith("ablations" + os.sep)} == before


def test_removing_every_layer_gives_the_zero_shot_metrics(ablated, lora_run):
  _, _, _, rows, _ = ablated
  with open(os.path.join(lora_run, "metrics.jsonl")) as f:
    zero = next(r for r in map(json.loads, f) if r["kind"] == "zero_shot")
  assert json.load(open(os.path.join(lora_run, "config.json")))["data"]["max_eval_examples"] == 8
  for metric in ("accuracy", "loss"):
    assert abs(_value(rows, "all layers", metric) - zero[metric]) < 1e-6, metric
  assert abs(_value(rows, "none", "loss") - zero["loss"]) > 1e-4  # the run moved away from the base


def test_rank_truncation_at_the_trained_rank_is_the_run(ablated):
  _, _, _, rows, _ = ablated
  for metric in ("accuracy", "loss"):
    assert abs(_value(rows, "rank 4", metric) - _value(rows, "none", metric)) < 1e-5, metric
  assert abs(_value(rows, "rank 1", "loss") - _value(rows, "none", "loss")) > 1e-6  # truncation does something


def test_truncation_is_the_best_rank_k_approximation():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 6, 4)).astype(np.float32), rng.normal(size=(2, 4, 5)).astype(np.float32)
  s = np.linalg.svd(a.astype(np.float64) @ b, compute_uv=False)
  for k in (1, 2, 4):
    a_k, b_k = ablate.truncate(a, b, k)
    assert a_k.shape == a.shape and b_k.shape == b.shape and a_k.dtype == np.float32
    assert not a_k[..., k:].any() and not b_k[..., k:, :].any()
    err = np.linalg.norm(a_k.astype(np.float64) @ b_k - a.astype(np.float64) @ b, axis=(-2, -1))
    assert np.allclose(err, np.sqrt((s[:, k:] ** 2).sum(-1)), atol=1e-5)  # Eckart-Young: the optimum
  assert ablate.powers_of_two(4) == [1, 2, 4] and ablate.powers_of_two(6) == [1, 2, 4, 6]
  assert ablate.powers_of_two(1) == [1]


def test_errors_are_one_line_exit_2_and_write_nothing(lora_run, tiny_model, tmp_path, capsys):
  # A run folder without checkpoints.
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in ("config.json", "base.json"):
    shutil.copy(os.path.join(lora_run, name), bare / name)
  assert cli.main(["ablate", "--workdir", str(bare), "--kind", "layers"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("jft ablate: error: ") and "no checkpoint" in err
  assert sorted(os.listdir(bare)) == ["base.json", "config.json"]
  # A kind that does not apply, asked for explicitly: decided from the run's config, before any restore
  # (a copy of the LoRA run relabelled IA3 keeps this test cheap; the slow test asks a trained IA3 run).
  ia3 = str(tmp_path / "ia3")
  shutil.copytree(lora_run, ia3, ignore=shutil.ignore_patterns("ablations"))
  config = json.load(open(os.path.join(ia3, "config.json")))
  config["method"] = {"name": "ia3", "hparams": {}}
  json.dump(config, open(os.path.join(ia3, "config.json"), "w"))
  before = _snapshot(ia3)
  assert cli.main(["ablate", "--workdir", ia3, "--kind", "rank", "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err == "jft ablate: error: rank does not apply to ia3 (no low-rank factors)\n"
  assert cli.main(["ablate", "--workdir", lora_run, "--kind", "tokens", "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err == "jft ablate: error: tokens does not apply to lora (no virtual tokens)\n"
  # --out over the run folder.
  assert cli.main(["ablate", "--workdir", lora_run, "--kind", "layers", "--out", lora_run]) == 2
  assert "refusing to write over the run folder" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out") and _snapshot(ia3) == before


@pytest.mark.slow
def test_ia3_and_prompt_tuning_ablations(tiny_model, tmp_path):
  """IA3: every layer removed = zero-shot; prompt tuning: tokens n = the run, layers do not apply."""
  ia3 = _train(tiny_model, str(tmp_path / "ia3"), ":steps=2,method=ia3")
  with pytest.raises(ablate.AblateError, match=r"^rank does not apply to ia3 \(no low-rank factors\)$"):
    ablate.run_ablations(ia3, ["rank"], out=str(tmp_path / "r"))
  assert not os.path.exists(tmp_path / "r")
  rows = ablate.run_ablations(ia3, ["all"], split="validation", limit=8, out=str(tmp_path / "a"),
                              notice=lambda line: None)
  with open(os.path.join(ia3, "metrics.jsonl")) as f:
    zero = next(r for r in map(json.loads, f) if r["kind"] == "zero_shot")
  everything = next(r for r in rows if r["ablation"] == "all layers")
  assert abs(everything["metrics"]["loss"] - zero["loss"]) < 1e-6
  assert [r["ablation"] for r in rows if r["kind"] == "modules"] == ["module k_proj", "module v_proj",
                                                                     "module down_proj"]
  prompt = _train(tiny_model, str(tmp_path / "prompt"), ":steps=2,method=prompt", {"num_virtual_tokens": 4})
  notes = []
  rows = ablate.run_ablations(prompt, ["all"], split="validation", limit=8, out=str(tmp_path / "p"),
                              notice=notes.append)
  assert [r["ablation"] for r in rows] == ["none", "tokens 1", "tokens 2", "tokens 4"]
  assert abs(rows[-1]["metrics"]["loss"] - rows[0]["metrics"]["loss"]) < 1e-6
  assert abs(rows[1]["metrics"]["loss"] - rows[0]["metrics"]["loss"]) > 1e-6
  assert any("layers does not apply to prompt" in n for n in notes)
  with pytest.raises(ablate.AblateError, match="layers does not apply to prompt"):
    ablate.run_ablations(prompt, ["layers"], out=str(tmp_path / "q"))
