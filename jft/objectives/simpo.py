"""SimPO (Meng, Xia and Chen, 2024): preference optimisation without a reference model.

The implicit reward of a completion is its *length-averaged* log-probability
under the policy, scaled by `beta`; the loss asks the chosen completion's
reward to beat the rejected one's by a target margin `gamma`:

    loss = -log s(beta (avg_chosen - avg_rejected) - gamma)

(with `label_smoothing` e: -(1-e) log s(x) - e log s(-x), the conservative
form). No reference forward pass runs, so SimPO also trains methods that change
the base itself (full fine-tuning). TRL runs the same loss as
`trl.experimental.cpo.CPOTrainer(loss_type="simpo", cpo_alpha=0)`;
`tests/test_simpo.py` holds `simpo_loss` to its `cpo_loss`.

This file is the whole objective: defining the class registers it, its rules
sit beside its fields, and `simpo_loss` is exported as `jft.objectives.simpo_loss`
(also `jft.align.simpo_loss`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft.core.fields import Float
from jft.objectives import preference

__all__ = ["simpo_loss"]


def simpo_loss(chosen_logps, rejected_logps, beta=2.0, gamma=0.5, label_smoothing=0.0):
  """[B] length-averaged completion log-probs of the chosen and rejected completions -> (batch-mean loss,
  metrics), as TRL 1.16's `CPOTrainer.cpo_loss` with `loss_type="simpo"`: its logits are
  `chosen - rejected - gamma / beta`. Metrics (TRL's names): rewards beta * log-prob of each side, their
  margin and accuracy, and the mean log-probs."""
  chosen, rejected = jnp.asarray(chosen_logps, jnp.float32), jnp.asarray(rejected_logps, jnp.float32)
  logits = chosen - rejected - gamma / beta
  e = label_smoothing
  losses = -(1 - e) * jax.nn.log_sigmoid(beta * logits) - e * jax.nn.log_sigmoid(-beta * logits)
  chosen_rewards = jax.lax.stop_gradient(beta * chosen)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected)
  metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
             "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32).mean(),
             "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
             "logps/chosen": jax.lax.stop_gradient(chosen).mean(),
             "logps/rejected": jax.lax.stop_gradient(rejected).mean()}
  return losses.mean(), metrics


@dataclasses.dataclass(frozen=True)
class SimPO(preference.PairObjective):
  """Reference-free, length-normalised preference optimisation with a target margin (`gamma`)."""
  name: ClassVar[str] = "simpo"
  beta: float = 2.0
  gamma: float = 0.5
  label_smoothing: float = 0.0
  hparam_rules: ClassVar[dict] = {"beta": Float(0, lo_open=True), "gamma": Float(0),
                                  "label_smoothing": Float(0, 0.5, hi_open=True)}

  def loss(self, forward, batch):
    ids, mask, completion = preference.pairs_flat(batch)
    sums = preference.policy_logps(forward, ids, mask, completion).sum(-1)
    averages = sums / jnp.maximum(completion.sum(-1), 1)  # TRL: average_log_prob for simpo
    chosen, rejected = preference.split_pairs(averages)
    return simpo_loss(chosen, rejected, beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing)
