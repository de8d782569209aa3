"""Sweeps: the space in the config file, points as run folders, resume after a killed worker, Optuna, reports."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jft import cli
from jft.studies import sweep
from jft.studies.space import Space, choice, grid, integer, loguniform, uniform
from jft.run.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _config_file(tmp_path, body: str, name="study.py") -> str:
  """A config file that reuses configs/tiny.py's get_config and defines its own sweep()."""
  path = tmp_path / name
  path.write_text(f"import runpy\nget_config = runpy.run_path({TINY!r})['get_config']\n"
                  "from jft.studies.space import Space, grid, choice, uniform, loguniform, integer\n\n"
                  f"def sweep(arg=None):\n  return {body}\n")
  return str(path)


def test_grid_and_random_plans_are_fixed_and_typed():
  spaces = [Space({"method.hparams.rank": grid(2, 4), "optim.lr": grid(1e-3, 1e-2)}),
            Space({"arg:method": grid("ia3"), "optim.lr": choice(1e-2, 3e-2)})]
  points = sweep.plan(spaces, "grid")
  assert points[:2] == [{"method.hparams.rank": 2, "optim.lr": 1e-3}, {"method.hparams.rank": 2, "optim.lr": 1e-2}]
  assert len(points) == 4 + 2 and points[-1] == {"arg:method": "ia3", "optim.lr": 3e-2}
  space = [Space({"a": uniform(0, 1), "b": loguniform(1e-4, 1e-2), "c": integer(1, 3), "d": choice("x", "y")})]
  first, again = sweep.plan(space, "random", trials=20, seed=3), sweep.plan(space, "random", trials=20, seed=3)
  assert first == again and first != sweep.plan(space, "random", trials=20, seed=4)  # same points on every machine
  for p in first:
    assert 0 <= p["a"] <= 1 and 1e-4 <= p["b"] <= 1e-2 and p["c"] in (1, 2, 3) and p["d"] in ("x", "y")
  assert {p["c"] for p in first} == {1, 2, 3}
  assert sweep.point_name(7, {"arg:method": "lora", "optim.lr": 3e-4, "x.targets": ("q", "v")}) == \
      "007-method=lora,lr=0.0003,targets=q+v"
  # The swept values reach the config typed, through the file argument or a field.
  c = sweep.point_config(TINY, [("model.name", "/m")], {"arg:method": "ia3", "optim.lr": 3e-2, "train.steps": 5})
  assert c.method.name == "ia3" and c.optim.lr == 3e-2 and c.train.steps == 5 and c.model.name == "/m"


@pytest.mark.parametrize("body, args, message", [
    ("Space({'optim.lrr': grid(1e-3)})", [], r"unknown config field 'optim.lrr'.*did you mean optim.lr"),
    ("Space({})", [], r"a sweep space has no dimensions"),
    ("[]", [], r"must return a jft.studies.space.Space"),
    ("Space({'train.steps': grid(2, 'many')})", [], r"train.steps: expected an int, got 'many'"),
    ("Space({'optim.lr': grid()})", [], r"'optim.lr' has no values"),
    ("Space({'train.steps': choice(2, 'x')}, trials=2)", ["--search", "optuna"], r"train.steps: expected an int"),
    ("Space({'optim.lr': loguniform(1e-3, 1e-2)})", [], r"grid search needs grid\(...\) or choice"),
    ("Space({'optim.lr': grid(1e-3, 1e-2)})", ["--point", "2"], r"--point 2: this sweep has points 0 .. 1"),
    ("Space({'optim.lr': grid(1e-3)})", ["--config.optim.lr=1"], r"--config.optim.lr is also swept"),
    ("Space({'optim.lr': grid(1e-3)})", ["--search", "random"], r"pass --trials N"),
])
def test_bad_sweeps_fail_in_one_line_and_write_nothing(tmp_path, capsys, body, args, message):
  import re
  path = _config_file(tmp_path, body)
  out = tmp_path / "sweep"
  code = cli.main(["sweep", "--config", path, "--config.model.name=/nowhere", "--workdir", str(out), *args])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
  assert not out.exists()


def test_a_sweep_folder_belongs_to_one_sweep(tmp_path, capsys):
  out = tmp_path / "sweep"
  out.mkdir()
  (out / "sweep.json").write_text(json.dumps({"config": "other.py"}))
  code = cli.main(["sweep", "--config", _config_file(tmp_path, "Space({'optim.lr': grid(1e-3)})"),
                   "--config.model.name=/nowhere", "--workdir", str(out)])
  assert code == 2 and "holds another sweep" in capsys.readouterr().err
  assert json.loads((out / "sweep.json").read_text()) == {"config": "other.py"}  # untouched


def _steps(folder):
  with open(os.path.join(folder, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if r["kind"] == "train"]


@pytest.mark.slow  # 96 s: two sweep points, a SIGKILLed worker, a retry; the default suite stays under 15 min
def test_sweep_survives_a_killed_worker_and_a_failing_point_then_resumes(tiny_model, tmp_path):
  """Point 0's worker is SIGKILLed after a checkpoint: the sweep retries it, and the retry resumes from the
  checkpoint. Point 1 cannot run (no example fits 2 tokens): retried once, then recorded with its error.
  Rerunning the command skips both."""
  path = _config_file(tmp_path, "Space({'data.max_length': grid(48, 2)})")
  out = str(tmp_path / "sweep")
  command = ["sweep", "--config", path, f"--config.model.name={tiny_model}", "--config.train.steps=10",
             "--config.train.eval_every=5", "--workdir", out]
  proc = subprocess.Popen([sys.executable, "-m", "jft.cli", *command], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT)
  deadline = time.time() + 300
  folder = os.path.join(out, "points", "000-max_length=48")
  while not os.path.isdir(os.path.join(folder, "checkpoints", "4")):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.1)
  worker = sweep.read_point(folder)["pid"]
  os.kill(worker, signal.SIGKILL)
  log, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, log
  assert "point 0: failed (worker exited with code -9); retrying once" in log
  first, second = sweep.read_point(folder), sweep.read_point(os.path.join(out, "points", "001-max_length=2"))
  assert first["status"] == "done" and first["attempts"] == 2 and first["failures"] == 1
  assert _steps(folder) == list(range(1, 11))  # resumed: steps after the checkpoint are logged once
  with open(os.path.join(out, "logs", "000-max_length=48.log")) as f:
    assert "resumed from step" in f.read()
  assert second["status"] == "failed" and second["failures"] == 2 and "does not fit" in second["error"]

  with open(os.path.join(out, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["point"], r["status"], r["data.max_length"]) for r in rows] == [("0", "done", "48"),
                                                                            ("1", "failed", "2")]
  assert rows[0]["best_accuracy"] and rows[0]["test_accuracy"] and int(rows[0]["trainable"]) > 0
  assert float(rows[0]["peak_rss_mib"]) > 0 and float(rows[0]["tokens_per_s"]) > 0
  for png in ("metric-vs-data.max_length.png", "loss-curves.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000
  assert "does not fit" in open(os.path.join(out, "results.md")).read()
  assert os.path.isfile(os.path.join(folder, "curves.png"))
  assert "![loss and evaluation curves](curves.png)" in open(os.path.join(folder, "summary.md")).read()

  # Rerun: nothing left to do; the report is rebuilt. `jft report` rebuilds it too, and a run's curves.
  t0 = time.time()
  assert cli.main(command) == 0
  assert sweep.read_point(folder)["attempts"] == 2 and time.time() - t0 < 60
  os.remove(os.path.join(out, "results.md"))
  assert cli.main(["report", out]) == 0 and os.path.isfile(os.path.join(out, "results.md"))
  os.remove(os.path.join(folder, "curves.png"))
  assert cli.main(["report", folder]) == 0 and os.path.isfile(os.path.join(folder, "curves.png"))
  # Point K alone (what one task of a scheduler's array runs): done already, so nothing runs.
  assert cli.main([*command, "--point", "0"]) == 0


def test_optuna_point_reports_its_evaluations_and_is_told_the_result(tiny_model, tmp_path):
  """An Optuna trial: the sampler's values make the point; the run reports each evaluation to the
  trial (what the median pruner reads); the sweep tells the study the point's best metric."""
  import optuna

  path = _config_file(tmp_path, "Space({'optim.lr': loguniform(1e-3, 1e-1), 'method.hparams.rank': integer(2, 4)}, "
                                "trials=2)")
  s = sweep.Sweep(path, [("model.name", tiny_model), ("train.steps", "4"), ("train.eval_every", "2")],
                  str(tmp_path / "opt"), search="optuna", echo=lambda *_: None)
  s._claim_folder()
  folder = s._prepare(0)
  record = sweep.read_point(folder)
  assert 1e-3 <= record["values"]["optim.lr"] <= 1e-1 and record["values"]["method.hparams.rank"] in (2, 3, 4)
  # Each ask seeds its sampler by the trials so far: the next (random startup) point is another one.
  assert sweep.read_point(s._prepare(1))["values"] != record["values"]
  assert sweep.run_point(folder) == 0
  s._tell(folder)
  study = optuna.load_study(study_name="jft", storage=record["optuna"]["storage"])
  trial = study.trials[0]
  assert trial.state == optuna.trial.TrialState.COMPLETE
  assert sorted(trial.intermediate_values) == [2]  # the eval at step 2 (the last one is the final validation)
  best = max(r["accuracy"] for r in map(json.loads, open(os.path.join(folder, "metrics.jsonl")))
             if r["kind"] == "eval")
  assert trial.value == pytest.approx(best)
  assert trial.params["optim.lr"] == record["values"]["optim.lr"]


def test_a_pruned_run_stops_at_its_evaluation_checkpointed(tiny_model, tmp_path):
  from jft import config as cfg
  c = cfg.build(TINY, [("model.name", tiny_model), ("train.steps", "8"), ("train.eval_every", "2")])
  seen = []
  results = train(c, str(tmp_path / "run"), echo=lambda *_: None,
                  on_eval=lambda step, metrics: seen.append((step, metrics["accuracy"])) or step >= 4)
  assert [s for s, _ in seen] == [2, 4] and results["pruned"] and results["steps"] == 4
  assert "test" not in results  # a pruned point is not a finished run
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "4")


def test_a_killed_worker_resumes_a_second_sweep_leaves_its_point_alone_and_a_rerun_skips(byte_model, tmp_path,
                                                                                       capsys):
  """The default suite's short version of the slow test above, plus two sweeps on one folder: sweep B,
  started while A runs point 0, leaves it to A and reports it as running; A's worker, SIGKILLed after a
  checkpoint, is retried and resumes (every step logged once); a rerun skips the finished point."""
  path = _config_file(tmp_path, "Space({'optim.lr': grid(1e-2)})")
  out = str(tmp_path / "sweep")
  command = ["sweep", "--config", path, f"--config.model.name={byte_model}", "--config.train.steps=6",
             "--config.train.save_every=2", "--config.train.eval_every=0", "--config.data.test_split=",
             "--config.eval.zero_shot=false", "--workdir", out]
  proc = subprocess.Popen([sys.executable, "-m", "jft.cli", *command], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT)
  folder = os.path.join(out, "points", "000-lr=0.01")
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(folder, "checkpoints", "2")):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.05)
  worker = sweep.read_point(folder)["pid"]
  assert cli.main(command) == 0  # sweep B, while A's worker runs point 0
  said = capsys.readouterr().out
  assert "1 point(s) running in another process (a second sweep on this folder), left to it: 0" in said, said
  assert "| 0 | running |" in open(os.path.join(out, "results.md")).read()
  os.kill(worker, signal.SIGKILL)
  log, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, log
  assert "point 0: failed (worker exited with code -9); retrying once" in log
  record = sweep.read_point(folder)
  assert (record["status"], record["attempts"], record["failures"]) == ("done", 2, 1)
  assert _steps(folder) == list(range(1, 7))  # resumed from its checkpoint: each step logged once
  with open(os.path.join(out, "logs", "000-lr=0.01.log")) as f:
    assert "resumed from step" in f.read()
  assert cli.main(command) == 0  # the rerun: nothing left to do
  assert "1 point(s) already finished: 0" in capsys.readouterr().out
  assert sweep.read_point(folder)["attempts"] == 2
