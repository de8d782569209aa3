"""The optax chain of a run, from config: optimizer, schedule, clipping, accumulation, decay rules.

It is built for the *trainable* tree only (the split happens before grad),
so frozen leaves have no optimizer state by construction.
"""

from __future__ import annotations

import jax
import optax

from jft.core import rules
from jft.peft import api
from jft.core.errors import JftError


class OptimError(JftError, ValueError):
  pass


def schedule(cfg, total_steps: int):
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.final_lr_ratio
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  else:
    raise OptimError(f"optim.schedule={cfg.schedule!r}; expected cosine, linear or constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _in_updates(cfg, k: int):
  """`cfg` with warmup counted in optimizer updates (k train steps each)."""
  if k == 1:
    return cfg
  updated = cfg.copy_and_resolve_references()
  with updated.unlocked():
    updated.warmup_steps = -(-cfg.warmup_steps // k)
  return updated


def decay_mask(cfg, trainable, method=None):
  """Which leaves take weight decay: the method's say for its own leaves (LoRA's magnitude,
  prompt vectors: no), and the config's rules (first full match wins; unmatched leaves decay)."""
  by_rule = rules.map_tree(tuple(map(tuple, cfg.decay_rules)), trainable, default=True,
                           require_all_rules_match=False)
  if method is None:
    return by_rule
  return jax.tree.map(lambda a, b: a and b, by_rule, api.decay_mask(method, trainable))


def make_optimizer(cfg, total_steps: int, trainable, method=None) -> optax.GradientTransformation:
  """optax from `cfg` for a run of `total_steps` train steps (micro-batches).

  With `grad_accum` k the schedule's clock is the optimizer's updates, one per k steps
  (`optax.MultiSteps`), so warmup and decay are counted in updates: ceil(steps / k) of them, warmup
  ceil(warmup_steps / k), and the run spans the whole schedule, as without accumulation.
  """
  k = max(cfg.grad_accum, 1)
  lr = schedule(_in_updates(cfg, k), -(-total_steps // k))
  decay = decay_mask(cfg, trainable, method)
  if cfg.name == "adamw":
    base = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay)
  elif cfg.name == "sgd":
    base = optax.sgd(lr, momentum=cfg.momentum or None)
    if cfg.weight_decay:
      base = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay), base)
  elif cfg.name == "adafactor":
    base = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None,
                           weight_decay_mask=decay if cfg.weight_decay else None)
  else:
    raise OptimError(f"optim.name={cfg.name!r}; expected adamw, sgd or adafactor")
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base) if cfg.clip_norm > 0 else base
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx
