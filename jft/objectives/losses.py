"""Alignment losses (DPO and its variants, ORPO, KTO, reward models, GRPO) as pure JAX functions.

(Formerly `jft.align`; that name still answers, for these and every loss an objective's own file
exports in its `__all__`.)

Each loss takes per-sequence or per-token log-probabilities (`token_logps`,
`sequence_logps`) and returns `(loss, metrics)`, with metrics named as TRL
logs them. TRL (`trl==1.16`) is the reference: `tests/test_align.py` checks
every loss, and the DPO gradients through a LoRA model, against TRL's own
trainers. Reference log-probabilities, old-policy log-probabilities and
TRL's KL estimates are constants (TRL computes them under `no_grad`), so they
pass through `stop_gradient` here: a caller may compute them inside the same
traced function.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jft.models.head import logps_of_logits, model_logps  # noqa: F401 (part of this API since jft.align)

__all__ = ["PREFERENCE_LOSSES", "GRPO_LOSSES", "logps_of_logits", "model_logps", "token_logps", "sequence_logps",
           "preference_loss", "orpo_loss", "kto_loss", "reward_loss", "group_advantages", "grpo_loss"]

PREFERENCE_LOSSES = ("sigmoid", "robust", "ipo", "hinge")
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo")

_sg = jax.lax.stop_gradient


def _f32(x):
  return jnp.asarray(x, jnp.float32)


# -- log-probabilities -----------------------------------------------------------


def token_logps(model, params, input_ids, attention_mask, completion_mask):
  """[B, T] completion-token log-probs of `model` (deterministic: the model as evaluated), by the one
  log-prob function training uses (`jft.models.head.model_logps`: through the fused head where it can)."""
  apply = lambda ids, mask, **kw: model.apply({"params": params}, ids, attention_mask=mask, **kw)
  return model_logps(apply, params, input_ids, attention_mask, completion_mask)


def sequence_logps(model, params, input_ids, attention_mask, completion_mask):
  """[B]: sum of `token_logps` over the completion (TRL's per-sequence log-probability)."""
  return token_logps(model, params, input_ids, attention_mask, completion_mask).sum(axis=-1)


# -- paired preferences: DPO family ------------------------------------------------


def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
                    loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
  """DPO-style loss of [B] sequence log-probs -> (batch-mean loss, metrics), as TRL's DPOTrainer.

  With log-ratios c = chosen - ref_chosen, r = rejected - ref_rejected,
  d = c - r and e = label_smoothing:
    sigmoid  -(1-e) log s(beta d) - e log s(-beta d)   (DPO; e > 0 is cDPO)
    robust   (-(1-e) log s(beta d) + e log s(-beta d)) / (1 - 2e)   (rDPO)
    ipo      (c/|chosen| - r/|rejected| - 1/(2 beta))^2   (lengths: completion tokens)
    hinge    max(0, 1 - beta d)
  TRL 1.16's `sigmoid` ignores `label_smoothing` (it only reads it for
  robust, exo_pair and aot); jft keeps the conservative-DPO form, which is
  TRL's at e = 0. Metrics: rewards beta*c, beta*r and their batch means.
  """
  if loss_type not in PREFERENCE_LOSSES:
    raise ValueError(f"unknown preference loss_type {loss_type!r}; choose one of {', '.join(PREFERENCE_LOSSES)}")
  chosen_logps, rejected_logps = _f32(chosen_logps), _f32(rejected_logps)
  chosen_ratio = chosen_logps - _sg(_f32(ref_chosen_logps))
  rejected_ratio = rejected_logps - _sg(_f32(ref_rejected_logps))
  delta = chosen_ratio - rejected_ratio
  e = label_smoothing
  if loss_type == "sigmoid":
    losses = -(1 - e) * jax.nn.log_sigmoid(beta * delta) - e * jax.nn.log_sigmoid(-beta * delta)
  elif loss_type == "robust":
    losses = (-(1 - e) * jax.nn.log_sigmoid(beta * delta) + e * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * e)
  elif loss_type == "ipo":
    if chosen_lengths is None or rejected_lengths is None:
      raise ValueError("loss_type='ipo' averages over completion tokens: pass chosen_lengths and rejected_lengths")
    avg = lambda ratio, n: ratio / jnp.maximum(_f32(n), 1.0)
    losses = (avg(chosen_ratio, chosen_lengths) - avg(rejected_ratio, rejected_lengths) - 1 / (2 * beta)) ** 2
  else:
    losses = jax.nn.relu(1 - beta * delta)
  chosen_rewards, rejected_rewards = _sg(beta * chosen_ratio), _sg(beta * rejected_ratio)
  metrics = {
      "rewards/chosen": chosen_rewards.mean(),
      "rewards/rejected": rejected_rewards.mean(),
      "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32).mean(),
      "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
      "logps/chosen": _sg(chosen_logps).mean(),
      "logps/rejected": _sg(rejected_logps).mean(),
  }
  return losses.mean(), metrics


def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, split at -log 2 as TRL's ORPO does (each branch sees only its own inputs)."""
  t = -math.log(2.0)
  low, high = jnp.minimum(x, t), jnp.maximum(x, t)
  return jnp.where(x < t, jnp.log1p(-jnp.exp(low)), jnp.log(-jnp.expm1(high)))


def orpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, nll_loss, beta=0.1):
  """ORPO (no reference model) -> (loss, metrics), as TRL's `experimental.orpo.ORPOTrainer`.

  With per-token averages a = logps / lengths (the summed [B] log-probs of
  each completion over its token count), the log odds ratio is
  l = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)) and
  loss = nll_loss - beta * mean(log s(l)). TRL's `nll_loss` is the chosen
  sequences' mean token cross-entropy over prompt *and* completion.
  """
  avg_chosen = _f32(chosen_logps) / jnp.maximum(_f32(chosen_lengths), 1.0)
  avg_rejected = _f32(rejected_logps) / jnp.maximum(_f32(rejected_lengths), 1.0)
  log_odds = (avg_chosen - avg_rejected) - (_log1mexp(avg_chosen) - _log1mexp(avg_rejected))
  ratio = jax.nn.log_sigmoid(log_odds)
  loss = nll_loss - beta * ratio.mean()
  chosen_rewards, rejected_rewards = _sg(beta * avg_chosen), _sg(beta * avg_rejected)
  metrics = {
      "rewards/chosen": chosen_rewards.mean(),
      "rewards/rejected": rejected_rewards.mean(),
      "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32).mean(),
      "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
      "logps/chosen": _sg(avg_chosen).mean(),
      "logps/rejected": _sg(avg_rejected).mean(),
      "nll_loss": _sg(nll_loss),
      "log_odds_ratio": _sg(ratio).mean(),
      "log_odds_chosen": _sg(log_odds).mean(),
  }
  return loss, metrics


# -- unpaired preferences: KTO ----------------------------------------------------


def kto_loss(policy_logps, ref_logps, desirable, policy_kl_logps, ref_kl_logps, beta=0.1, desirable_weight=1.0,
             undesirable_weight=1.0):
  """KTO of [B] sequence log-probs -> (mean over the batch of weighted losses, metrics), as TRL's KTOTrainer.

  z = max(0, mean(policy_kl - ref_kl)) is the batch KL estimate from
  mismatched (prompt, completion) pairs (TRL pairs prompt i with completion
  i-1 within a batch), a constant. With r = policy - ref:
    desirable    w_d (1 - s(beta (r - z)))
    undesirable  w_u (1 - s(beta (z - r)))
  Reward and log-prob metrics average over each class (0 for an empty one,
  which TRL does not log); `rewards/margins` is their difference.
  """
  desirable = jnp.asarray(desirable, bool)
  policy_logps = _f32(policy_logps)
  ratio = policy_logps - _sg(_f32(ref_logps))
  kl = _sg(jnp.maximum((_f32(policy_kl_logps) - _f32(ref_kl_logps)).mean(), 0.0))
  losses = jnp.where(desirable, desirable_weight * (1 - jax.nn.sigmoid(beta * (ratio - kl))),
                     undesirable_weight * (1 - jax.nn.sigmoid(beta * (kl - ratio))))
  rewards = _sg(beta * ratio)
  n_chosen = desirable.sum()
  n_rejected = desirable.size - n_chosen
  mean_over = lambda x, which, n: jnp.where(which, x, 0.0).sum() / jnp.maximum(n, 1)
  metrics = {
      "kl": kl,
      "rewards/chosen": mean_over(rewards, desirable, n_chosen),
      "rewards/rejected": mean_over(rewards, ~desirable, n_rejected),
      "logps/chosen": mean_over(_sg(policy_logps), desirable, n_chosen),
      "logps/rejected": mean_over(_sg(policy_logps), ~desirable, n_rejected),
  }
  metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
  return losses.mean(), metrics


# -- reward models ---------------------------------------------------------------


def reward_loss(chosen_rewards, rejected_rewards, margin=None, center_rewards_coefficient=None):
  """Bradley-Terry loss of [B] scalar rewards, as TRL's RewardTrainer: mean -log s(r_c - r_r - margin).

  `center_rewards_coefficient` adds c * mean((r_c + r_r)^2). Metrics as TRL
  logs them: `accuracy` (r_c > r_r), `margin` (mean r_c - r_r, without the
  margin input), and the min/mean/max over all 2B rewards.
  """
  chosen, rejected = _f32(chosen_rewards), _f32(rejected_rewards)
  diff = chosen - rejected if margin is None else chosen - rejected - _f32(margin)
  loss = -jax.nn.log_sigmoid(diff).mean()
  if center_rewards_coefficient is not None:
    loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
  both = _sg(jnp.concatenate([chosen, rejected]))
  metrics = {
      "accuracy": (chosen > rejected).astype(jnp.float32).mean(),
      "margin": _sg(chosen - rejected).mean(),
      "min_reward": both.min(),
      "mean_reward": both.mean(),
      "max_reward": both.max(),
  }
  return loss, metrics


# -- GRPO --------------------------------------------------------------------------


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
  """[N] rewards of N/group_size prompts x group_size completions (grouped contiguously) -> [N] advantages.

  A = r - mean(group), divided by std + eps when scaling, as TRL's
  GRPOTrainer: the std is unbiased (Bessel, ddof=1), over the group
  (`scale=True` or "group", TRL's default) or the whole batch ("batch");
  `False` or "none" only centres. A group of one has std 0 (as in TRL).
  """
  mode = {True: "group", False: "none"}.get(scale, scale)
  if mode not in ("group", "batch", "none"):
    raise ValueError(f"unknown scale {scale!r}; choose True/'group', 'batch' or False/'none'")
  rewards = _f32(rewards)
  grouped = rewards.reshape(-1, group_size)
  advantages = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)
  if mode == "none":
    return advantages
  if mode == "group":
    std = grouped.std(axis=1, ddof=1) if group_size > 1 else jnp.zeros(grouped.shape[0])
    std = jnp.repeat(std, group_size)
  else:
    std = rewards.std(ddof=1) if rewards.size > 1 else jnp.zeros(())
  return advantages / (std + eps)


def grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, epsilon=0.2, beta=0.04, loss_type="grpo",
              max_completion_length=None, epsilon_high=None):
  """Clipped GRPO surrogate of [B, T] completion-token log-probs -> (loss, metrics), as TRL's GRPOTrainer.

  Per token, with ratio q = exp(logps - old_logps) and [B] advantages A:
  -min(q A, clip(q, 1 - epsilon, 1 + epsilon_high) A) + beta * k3, where
  k3 = exp(ref - logps) - (ref - logps) - 1. Aggregated over completion
  tokens by `loss_type`: grpo = mean over sequences of each one's token mean;
  bnpo = mean over all tokens; dr_grpo = sum / (B * max_completion_length)
  (the padded width T when None). `ref_logps` may be None only when beta = 0
  (as TRL, which then loads no reference). `epsilon_high` (TRL's DAPO
  clip-higher) defaults to `epsilon`. Metrics: `kl` (token mean of k3, when
  there is a reference), `clip_ratio` (fraction of tokens where the clip is
  active: q < 1 - epsilon with A < 0 or q > 1 + epsilon_high with A > 0;
  TRL's `clip_ratio/region_mean`) and its `clip_ratio/low_mean`,
  `clip_ratio/high_mean` halves.
  """
  if loss_type not in GRPO_LOSSES:
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {', '.join(GRPO_LOSSES)}")
  if ref_logps is None and beta != 0.0:
    raise ValueError(f"beta={beta} needs ref_logps for the KL term; pass them or set beta=0")
  eps_high = epsilon if epsilon_high is None else epsilon_high
  logps = _f32(logps)
  mask = _f32(completion_mask)
  adv = _f32(advantages)[:, None]
  ratio = jnp.exp(logps - _sg(_f32(old_logps)))
  clipped = jnp.clip(ratio, 1 - epsilon, 1 + eps_high)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  tokens = jnp.maximum(mask.sum(), 1.0)
  metrics = {}
  if ref_logps is not None:
    d = _sg(_f32(ref_logps)) - logps
    kl = jnp.exp(d) - d - 1
    if beta != 0.0:
      per_token = per_token + beta * kl
    metrics["kl"] = _sg(kl * mask).sum() / tokens
  if loss_type == "grpo":
    loss = ((per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).mean()
  elif loss_type == "bnpo":
    loss = (per_token * mask).sum() / tokens
  else:
    width = mask.shape[1] if max_completion_length is None else max_completion_length
    loss = (per_token * mask).sum() / (mask.shape[0] * width)
  low = _sg((ratio < 1 - epsilon) & (adv < 0)).astype(jnp.float32)
  high = _sg((ratio > 1 + eps_high) & (adv > 0)).astype(jnp.float32)
  metrics["clip_ratio/low_mean"] = (low * mask).sum() / tokens
  metrics["clip_ratio/high_mean"] = (high * mask).sum() / tokens
  metrics["clip_ratio"] = (jnp.maximum(low, high) * mask).sum() / tokens
  return loss, metrics
