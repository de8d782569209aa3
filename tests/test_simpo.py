"""SimPO, the objective added as one file (jft/objectives/simpo.py): its loss equals TRL's, it trains
through `jft train`, and nothing else in jft/ names it.

TRL 1.16 runs SimPO as `trl.experimental.cpo.CPOTrainer` with `loss_type="simpo"`; its `cpo_loss` is
called on an instance without __init__ (the stand-in of test_align.py), on fixed length-averaged
log-probs.
"""

import ast
import json
import os
import types

import jax
import numpy as np
import pytest

import jft.align
from jft import objectives
from jft.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _trl_cpo(beta, gamma, label_smoothing):
  from trl.experimental.cpo import CPOTrainer

  trainer = object.__new__(CPOTrainer)
  trainer.__dict__.update(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing,
                          loss_type="simpo", accelerator=types.SimpleNamespace(device="cpu"))
  return trainer


@pytest.mark.parametrize("beta,gamma,smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (1.0, 0.0, 0.2), (10.0, 3.0, 0.1)])
def test_simpo_loss_equals_trl_cpo_simpo(beta, gamma, smoothing):
  import torch

  rng = np.random.RandomState(int(beta * 10 + gamma))
  chosen = -rng.uniform(0.2, 3.0, 6).astype(np.float32)  # length-averaged log-probs
  rejected = -rng.uniform(0.2, 3.0, 6).astype(np.float32)
  tc, tr = torch.tensor(chosen, requires_grad=True), torch.tensor(rejected, requires_grad=True)
  trl_losses, trl_chosen, trl_rejected = _trl_cpo(beta, gamma, smoothing).cpo_loss(tc, tr)
  trl_losses.mean().backward()

  fn = lambda c, r: jft.align.simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=smoothing)
  (loss, metrics), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(chosen, rejected)
  assert abs(float(loss) - trl_losses.mean().item()) <= 1e-5
  np.testing.assert_allclose(np.asarray(grads[0]), tc.grad.numpy(), atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grads[1]), tr.grad.numpy(), atol=1e-6, rtol=1e-5)
  assert abs(float(metrics["rewards/chosen"]) - trl_chosen.mean().item()) <= 1e-5
  assert abs(float(metrics["rewards/rejected"]) - trl_rejected.mean().item()) <= 1e-5
  assert float(metrics["rewards/accuracies"]) == float((trl_chosen > trl_rejected).float().mean())


def _code(path: str) -> str:
  """A module's code without its comments and docstrings (documentation may list the objectives)."""
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
      node.body = body[1:] or [ast.Pass()]
  return ast.unparse(tree)


def test_simpo_is_one_file_and_its_rules_check_configs():
  """Registered, exported and validated from its own file alone: no other module of jft/ names it in code."""
  named = []
  for folder, _, names in os.walk(os.path.join(ROOT, "jft")):
    for name in names:
      path = os.path.join(folder, name)
      if name.endswith(".py") and "simpo" in _code(path).lower():
        named.append(os.path.relpath(path, ROOT))
  assert named == [os.path.join("jft", "objectives", "simpo.py")]
  assert objectives.simpo_loss is jft.align.simpo_loss
  with pytest.raises(objectives.ObjectiveError, match=r"beta=0.0: expected a finite float > 0"):
    objectives.build("simpo", beta=0.0)
  assert not objectives.build("simpo").uses_reference


def test_simpo_trains_through_jft_train(byte_model, tmp_path):
  rows = [{"prompt": f"Question {i}: say yes?", "chosen": "yes " * (1 + i % 3), "rejected": "no"} for i in range(24)]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  workdir = tmp_path / "run"
  assert main(["train", "--config", f"{TINY}:objective=simpo,steps=6", f"--config.model.name={byte_model}",
               f"--config.data.path={tmp_path / 'pairs.jsonl'}", "--config.data.holdout=0.25",
               "--config.train.eval_every=0", f"--workdir={workdir}"]) == 0
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(train) == 6 and train[-1] < train[0] - 0.01, train
  results = json.load(open(workdir / "results.json"))
  assert results["data"]["splits"]["validation"]["holdout"] is True
  assert 0.0 <= results["validation"]["rewards/accuracies"] <= 1.0 and np.isfinite(results["validation"]["loss"])
