"""Evaluation: loss/perplexity, label-word accuracy, exact match from greedy generation.

Every function takes the model as the method configured it and the params as
the model runs them (`method.materialize(...)`), so training, `jft eval` and
ablations measure the same thing.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft import data
from jft.models.generate import Sampling, generate
from jft.step import next_token_loss


@functools.partial(jax.jit, static_argnames=("model",))
def _loss_sums(model, params, batch):
  logits = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"])
  loss, n = next_token_loss(logits, batch["input_ids"], batch["loss_mask"])
  return loss * n, n


def loss_and_perplexity(model, params, rows, batch_size: int = 16) -> dict:
  total = count = 0.0
  for batch, n in data.eval_batches(rows, batch_size, left=False):
    batch = {k: v.copy() for k, v in batch.items()}
    batch["loss_mask"][n:] = 0  # filler rows repeat the last example; they must not count
    s, c = _loss_sums(model, params, {k: jnp.asarray(v) for k, v in batch.items()})
    total, count = total + float(s), count + float(c)
  loss = total / max(count, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def label_token_ids(tokenizer, labels: Sequence[str], chat: bool) -> list[int]:
  """The first token of each label word as the model would write it; they must differ."""
  ids = [data.response_ids(tokenizer, label, chat)[0] for label in labels]
  if len(set(ids)) != len(ids):
    raise data.DataError(f"labels {list(labels)} share their first token {ids}; choose distinct label words")
  return ids


@functools.partial(jax.jit, static_argnames=("model",))
def _last_logits(model, params, ids, mask):
  return model.apply({"params": params}, ids, attention_mask=mask, last_only=True)[:, -1]


def label_accuracy(model, params, tokenizer, examples, labels: Sequence[str], chat: bool,
                   batch_size: int = 32, max_length: int = 256) -> dict:
  """Accuracy of argmax over the label words' first-token logits after each prompt."""
  label_ids = jnp.asarray(label_token_ids(tokenizer, labels, chat))
  prompts = [np.asarray(tokenizer(ex["prompt"], add_special_tokens=not chat)["input_ids"][-max_length:], np.int32)
             for ex in examples]
  rows = [(p, np.zeros_like(p)) for p in prompts]
  correct, predictions = 0, []
  for start, (batch, n) in zip(range(0, len(rows), batch_size), data.eval_batches(rows, batch_size)):
    logits = _last_logits(model, params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    pred = np.asarray(jnp.argmax(logits[:, label_ids], axis=-1))[:n]
    predictions += pred.tolist()
    correct += int(sum(int(p) == examples[start + i]["label"] for i, p in enumerate(pred)))
  return {"accuracy": correct / max(len(examples), 1), "predictions": predictions}


def exact_match(model, params, tokenizer, examples, chat: bool, batch_size: int = 16,
                max_new_tokens: int = 4) -> dict:
  """Greedy generation compared with the response text (case and surrounding space ignored)."""
  stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  hits = 0
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    prompts = [tokenizer(ex["prompt"], add_special_tokens=not chat)["input_ids"] for ex in chunk]
    outs = generate(model, params, prompts, Sampling(max_new_tokens=max_new_tokens), stop_tokens=stops)
    for ex, out in zip(chunk, outs):
      text = tokenizer.decode(out, skip_special_tokens=True).strip().lower()
      hits += int(text == ex["response"].strip().lower())
  return {"exact_match": hits / max(len(examples), 1)}
