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

from jft.peft import api


def next_token_loss(logits, input_ids, loss_mask):
  """Mean cross-entropy of predicting token t+1 at t, over positions where loss_mask[t+1] = 1.

  Returns (loss, number of predicted tokens).
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  weights = loss_mask[:, 1:].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  n = jnp.maximum(weights.sum(), 1.0)
  return ((logz - picked) * weights).sum() / n, weights.sum()


def training_model(model, method: api.Method):
  """The model as trained: the method's hook settings, dropout switched on."""
  model = method.configure(model)
  return model.clone(settings=dataclasses.replace(model.settings, deterministic=False))


def make_loss_fn(model, method: api.Method):
  def loss_fn(trainable, frozen, batch, rng):
    params = method.materialize(api.combine(trainable, frozen))
    logits = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                         rngs={"dropout": rng})
    mask = batch.get("loss_mask", batch["attention_mask"])
    return next_token_loss(logits, batch["input_ids"], mask)
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
