"""Evaluation: loss/perplexity, label-word accuracy, exact match from greedy generation.

Every function takes the model as the method configured it and the params as
the model runs them (`method.materialize(...)`), so training, `jft eval` and
ablations measure the same thing. With a `mesh`, every batch is split over
its batch axes (each process keeps its rows) and only sums leave the device,
so metrics are the same on one device and on many processes.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft import data
from jft.models import sharding
from jft.models import head as fused  # `head` names the output projection here
from jft.core import progress
from jft.models.generate import Sampling, generate


@functools.partial(jax.jit, static_argnames=("model",))
def _loss_sums(model, params, batch):
  """Through the fused head where the model allows: no [B, T, vocab] logits, the head only at loss positions."""
  apply = functools.partial(model.apply, {"params": params})
  loss, n = fused.model_loss(apply, params, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
  return loss * n, n


def _summary(total: float, count: float) -> dict:
  loss = total / max(count, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _place(batch: dict, mesh):
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  return sharding.host_batch(mesh, batch)


def _batch_size(batch_size: int, mesh) -> int:
  """Rounded up to a multiple of the mesh's batch axes (the extra rows are fillers)."""
  if mesh is None:
    return batch_size
  n = sharding.batch_size_divides(mesh)
  return -(-batch_size // n) * n


def loss_and_perplexity(model, params, rows, batch_size: int = 16, mesh=None) -> dict:
  total = count = 0.0
  for batch, _ in data.eval_batches(rows, _batch_size(batch_size, mesh), left=False):
    s, c = _loss_sums(model, params, _place(batch, mesh))
    total, count = total + float(s), count + float(c)
  return _summary(total, count)


@functools.partial(jax.jit, static_argnames=("model",))
def _classification_sums(model, params, batch, label_ids):
  ids, mask, answer = batch["input_ids"], batch["loss_mask"], batch["answer"][:, None, None]
  head = fused.output_head(params)
  out = model.apply({"params": params}, ids, attention_mask=batch["attention_mask"], return_hidden=head is not None)
  if head is None:
    loss, n = fused.next_token_loss(out, ids, mask)
    at_answer = jnp.take_along_axis(out, answer, axis=1)[:, 0]
  else:  # the head runs at the response tokens and the answer position only
    loss, n = fused.head_loss(out, params, head, ids, mask, False)
    at_answer = fused.project(jnp.take_along_axis(out, answer, axis=1)[:, 0], params, head)
  hit = (jnp.argmax(at_answer[:, label_ids], axis=-1) == batch["gold"]) & (batch["valid"] != 0)
  return loss * n, n, hit.sum()


def classification(model, params, rows, labels: Sequence[int], label_ids: Sequence[int], batch_size: int = 32,
                   mesh=None) -> dict:
  """Loss/perplexity of the responses and label-word accuracy, from one forward pass.

  The prediction at the position before the response compares the logits of
  each label word's first token (the response is the gold label word).
  """
  total = count = 0.0
  correct = 0
  label_ids = jnp.asarray(label_ids)
  batch_size = _batch_size(batch_size, mesh)
  for start, (batch, n) in zip(range(0, len(rows), batch_size), data.eval_batches(rows, batch_size, left=False)):
    batch["answer"] = (np.argmax(batch["loss_mask"] > 0, axis=1) - 1).astype(np.int32)  # last prompt token
    batch["gold"] = np.asarray(list(labels[start:start + n]) + [0] * (batch_size - n), np.int32)
    s, c, hits = _classification_sums(model, params, _place(batch, mesh), label_ids)
    total, count, correct = total + float(s), count + float(c), correct + int(hits)
  return {**_summary(total, count), "accuracy": correct / max(len(rows), 1)}


def label_token_ids(tokenizer, labels: Sequence[str], chat: bool) -> list[int]:
  """The first token of each label word as the model would write it; they must differ."""
  ids = [data.response_ids(tokenizer, label, chat)[0] for label in labels]
  if len(set(ids)) != len(ids):
    raise data.DataError(f"labels {list(labels)} share their first token {ids}; choose distinct label words")
  return ids


def exact_match(model, params, tokenizer, examples, chat: bool, batch_size: int = 16,
                max_new_tokens: int = 4) -> dict:
  """Greedy generation compared with the response text (case and surrounding space ignored)."""
  stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  hits = 0
  for start in progress.track(range(0, len(examples), batch_size), -(-len(examples) // batch_size),
                              "generating (batches)"):
    chunk = examples[start:start + batch_size]
    prompts = [tokenizer(ex["prompt"], add_special_tokens=not chat)["input_ids"] for ex in chunk]
    outs = generate(model, params, prompts, Sampling(max_new_tokens=max_new_tokens), stop_tokens=stops)
    for ex, out in zip(chunk, outs):
      text = tokenizer.decode(out, skip_special_tokens=True).strip().lower()
      hits += int(text == ex["response"].strip().lower())
  return {"exact_match": hits / max(len(examples), 1)}
