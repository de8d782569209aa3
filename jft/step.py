"""The loss and the jitted train step: one pure function of (trainable, frozen, batch).

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

from jft import loss as losses, rules
from jft.peft import api


def training_model(model, method: api.Method):
  """The model as trained: the method's hook settings, dropout switched on."""
  model = method.configure(model)
  return model.clone(settings=dataclasses.replace(model.settings, deterministic=False))


def make_loss_fn(model, method: api.Method):
  """(trainable, frozen, batch, rng) -> (mean next-token loss, predicted tokens).

  The output projection and the loss are fused (`jft.loss.head_loss`: no
  vocab-sized logits) unless a method or quantization changes that layer.
  """
  def loss_fn(trainable, frozen, batch, rng):
    params = method.materialize(api.combine(trainable, frozen))
    mask = batch.get("loss_mask", batch["attention_mask"])
    head = losses.output_head(params)
    out = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                      rngs={"dropout": rng}, return_hidden=head is not None)
    if head is None:
      return losses.next_token_loss(out, batch["input_ids"], mask)
    trains_head = head.path in rules.flatten(trainable)
    return losses.head_loss(out, params, head, batch["input_ids"], mask, trains_head)
  return loss_fn


def make_train_step(model, method: api.Method, tx: optax.GradientTransformation, donate: bool = True,
                    skip_nonfinite: bool = False, shardings: dict | None = None):
  """-> jitted step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics).

  With `skip_nonfinite`, a step whose loss or gradient is NaN/Inf leaves the
  state unchanged (metrics["skipped"] = 1) instead of poisoning it.
  `shardings` (`State.step_shardings()`) pins inputs and outputs: the state
  leaves the step exactly as it came in, and metrics are replicated.
  """
  loss_fn = make_loss_fn(training_model(model, method), method)
  placement = {}
  if shardings is not None:
    s = shardings
    placement = dict(in_shardings=(s["trainable"], s["opt_state"], s["frozen"], s["batch"], s["replicated"]),
                     out_shardings=(s["trainable"], s["opt_state"], s["replicated"]))

  @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else (), **placement)
  def step(trainable, opt_state, frozen, batch, rng):
    (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, rng)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "loss_tokens": tokens, "grad_norm": grad_norm,
               "tokens": (batch["attention_mask"] != 0).sum()}
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jnp.where(ok, new, old)
      new_trainable = jax.tree.map(keep, new_trainable, trainable)
      new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
      metrics["skipped"] = 1 - ok.astype(jnp.int32)
    return new_trainable, new_opt_state, metrics

  return step
