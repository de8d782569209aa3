"""Kill a run anywhere: SIGKILL a tiny `jft train` at evenly spaced instants across its life (compile, steps,
periodic evaluation, the first and later saves, best-checkpoint saves), then `--resume` it: every run
completes with the uninterrupted run's losses, each step logged once.

The default suite kills at 5 instants, `slow` at 30.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
RUN = ["--config.train.steps=8", "--config.train.save_every=2", "--config.train.eval_every=3",
       "--config.train.log_every=1", "--config.train.keep=2", "--config.data.max_eval_examples=4",
       "--config.data.test_split=", "--config.eval.zero_shot=true"]


def _train(model: str, workdir: str, *extra) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "jft.cli", "train", "--config", TINY, f"--config.model.name={model}",
                           *RUN, "--workdir", workdir, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT, env={**os.environ, "JFT_DEBUG": "1"})


def _train_losses(workdir: str) -> list:
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(byte_model, tmp_path_factory):
  """(losses, seconds) of the uninterrupted run (its compile is cached for the killed ones)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  t0 = time.time()
  p = _train(byte_model, workdir)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  seconds = time.time() - t0
  p = _train(byte_model, str(tmp_path_factory.mktemp("timed") / "run"))  # timed again with a warm cache
  t0 = time.time()
  p.communicate(timeout=600)
  return _train_losses(workdir), min(seconds, time.time() - t0)


def _kill_and_resume(model: str, workdir: str, at: float, expected: list):
  p = _train(model, workdir)
  time.sleep(at)
  p.send_signal(signal.SIGKILL)
  p.wait()
  p = _train(model, workdir, "--resume")
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, f"resume after a kill at {at:.1f}s failed:\n{err[-3000:]}"
  assert _train_losses(workdir) == expected, f"killed at {at:.1f}s:\n{out[-2000:]}"
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["steps"] == 8 and not results["interrupted"]


def _instants(n: int, seconds: float) -> list:
  return [seconds * (i + 0.5) / n for i in range(n)]


@pytest.mark.parametrize("i", range(5))
def test_a_run_killed_at_any_of_5_instants_resumes_to_the_same_losses(byte_model, reference, tmp_path, i):
  expected, seconds = reference
  _kill_and_resume(byte_model, str(tmp_path / "run"), _instants(5, seconds)[i], expected)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(30))
def test_a_run_killed_at_any_of_30_instants_resumes_to_the_same_losses(byte_model, reference, tmp_path, i):
  expected, seconds = reference
  _kill_and_resume(byte_model, str(tmp_path / "run"), _instants(30, seconds)[i], expected)
