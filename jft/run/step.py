"""The jitted train step: an objective's loss, differentiated w.r.t. the trainable leaves only.

The gradient is taken with respect to the trainable part only; the frozen
base (dense, bf16 or quantized) is an ordinary argument, never differentiated
and never captured in a closure, so it can be sharded and donated like any
other input. Trainer, benchmarks and tests all use this one step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from jft import objectives
from jft.core import rules
from jft.peft import api


def training_model(model, method: api.Method):
  """The model as trained: the method's hook settings, dropout switched on."""
  model = method.configure(model)
  return model.clone(settings=dataclasses.replace(model.settings, deterministic=False))


def make_loss_fn(model, method: api.Method, objective=None, teacher_model=None):
  """(trainable, frozen, batch, rng[, teacher]) -> (loss, metrics) of `objective` (default: next-token SFT).

  The policy is the method's materialized tree; objectives that need a
  reference model get the base view of the same `frozen` tree (no copy).
  A distillation's teacher params (`teacher`) run through `teacher_model`
  (`objective.with_teacher`); they are an argument, never differentiated.
  """
  objective = objective or objectives.build("sft")
  train_model, eval_model = training_model(model, method), method.configure(model)

  def loss_fn(trainable, frozen, batch, rng, teacher=None):
    params = method.materialize(api.combine(trainable, frozen))
    reference = objectives.base_view(method, frozen) if objective.uses_reference else None
    forward = objectives.Forward(train_model, eval_model, params, reference, rng,
                                 frozenset(rules.flatten(trainable)))
    if teacher is not None:
      forward = objective.with_teacher(forward, teacher_model, teacher)
    return objective.loss(forward, batch)
  return loss_fn


def make_train_step(model, method: api.Method, tx: optax.GradientTransformation, donate: bool = True,
                    skip_nonfinite: bool = False, shardings: dict | None = None, objective=None, teacher=None):
  """-> jitted step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics).

  With `skip_nonfinite`, a step whose loss or gradient is NaN/Inf leaves the
  state unchanged (metrics["skipped"] = 1) instead of poisoning it.
  `shardings` (`State.step_shardings()`) pins inputs and outputs: the state
  leaves the step exactly as it came in, and metrics are replicated.
  `teacher` = (model, params) of a distillation's teacher: its params go into
  every call as one more argument, placed where they are (`_WithTeacher`).
  """
  loss_fn = make_loss_fn(model, method, objective, teacher[0] if teacher is not None else None)
  placement = {}
  if shardings is not None:
    s = shardings
    extra = () if teacher is None else (jax.tree.map(lambda a: a.sharding, teacher[1]),)
    placement = dict(in_shardings=(s["trainable"], s["opt_state"], s["frozen"], s["batch"], s["replicated"],
                                   *extra),
                     out_shardings=(s["trainable"], s["opt_state"], s["replicated"]))

  @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else (), **placement)
  def step(trainable, opt_state, frozen, batch, rng, *teacher_params):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, rng, *teacher_params)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "tokens": (batch["attention_mask"] != 0).sum()}
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jnp.where(ok, new, old)
      new_trainable = jax.tree.map(keep, new_trainable, trainable)
      new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
      metrics["skipped"] = 1 - ok.astype(jnp.int32)
    return new_trainable, new_opt_state, metrics

  return step if teacher is None else _WithTeacher(step, teacher[1])


class _WithTeacher:
  """A step that takes the teacher's params as its last argument, called (and lowered, for
  `jft.run.memory`) with the usual five: the frozen teacher rides along, outside the optimizer state."""

  def __init__(self, step, teacher_params):
    self.step, self.teacher = step, teacher_params

  def __call__(self, *args):
    return self.step(*args, self.teacher)

  def lower(self, *args):
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                          self.teacher)
    return self.step.lower(*args, shapes)
