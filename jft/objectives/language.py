"""Next-token objectives: language modelling, SFT, classification as generation of a label word.

All three minimise the same loss, the mean cross-entropy of the tokens the
loss mask selects (every token for `lm`, the response for `sft` and
`classification`), with the output projection fused into the loss
(`jft.models.head.head_loss`) so no vocab-sized logits exist in the step. They
differ in what a row is and in what evaluation reports.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from jft import data
from jft.objectives import evaluate
from jft.models import head
from jft.objectives import api


def next_token_loss(forward: api.Forward, batch: dict):
  """(mean next-token loss over `loss_mask`, metrics) of a padded or packed batch."""
  mask = batch.get("loss_mask", batch["attention_mask"])
  loss, tokens = head.model_loss(forward.apply, forward.params, batch["input_ids"], batch["attention_mask"], mask,
                                   forward.trained)
  return loss, {"loss_tokens": tokens}


@dataclasses.dataclass(frozen=True)
class SFT(api.Objective):
  """Prompt/response pairs (`data.prompt_field`, `data.response_field`); loss on the response."""
  name: ClassVar[str] = "sft"
  packable: ClassVar[bool] = True

  def examples(self, d, tokenizer, split, limit):
    return data.sft_examples(data.load_split(d.path, split, **data.holdout_of(d)), tokenizer,
                             prompt_field=d.prompt_field, response_field=d.response_field, template=d.template,
                             chat=d.chat, limit=limit, system=d.system)

  def rows(self, examples, tokenizer, d):
    return data.tokenize(examples, tokenizer, d.max_length, d.chat, d.truncation)

  def collate(self, rows, length, pad_id):
    return data.pad_batch(rows, length, pad_id)

  def loss(self, forward, batch):
    return next_token_loss(forward, batch)

  def evaluate(self, config, forward, tokenizer, examples, mesh=None):
    out = evaluate.loss_and_perplexity(forward.model, forward.params, self.rows(examples, tokenizer, config.data),
                                       config.eval.batch_size, mesh=mesh)
    return {**out, **self.exact_match(config, forward, tokenizer, examples)}

  def exact_match(self, config, forward, tokenizer, examples) -> dict:
    """Greedy generation against the response text, when `eval.exact_match` asks for it."""
    if not config.eval.exact_match:
      return {}
    return evaluate.exact_match(forward.model, forward.params, tokenizer, examples, config.data.chat,
                                config.eval.batch_size)


@dataclasses.dataclass(frozen=True)
class Classification(SFT):
  """Text (`data.text_field`) -> one of `data.labels` written as the response; reports accuracy."""
  name: ClassVar[str] = "classification"

  def examples(self, d, tokenizer, split, limit):
    return data.classification_examples(data.load_split(d.path, split, **data.holdout_of(d)), tokenizer,
                                        text_field=d.text_field, label_field=d.label_field, labels=tuple(d.labels),
                                        template=d.template, chat=d.chat, limit=limit, system=d.system)

  def evaluate(self, config, forward, tokenizer, examples, mesh=None):
    d = config.data
    out = evaluate.classification(forward.model, forward.params, self.rows(examples, tokenizer, d),
                                  [ex["label"] for ex in examples],
                                  evaluate.label_token_ids(tokenizer, tuple(d.labels), d.chat),
                                  config.eval.batch_size, mesh=mesh)
    return {**out, **self.exact_match(config, forward, tokenizer, examples)}


@dataclasses.dataclass(frozen=True)
class LanguageModel(SFT):
  """Plain text (`data.text_field`, rendered through `data.template`); loss on every token.

  A row is the text's tokens (with the tokenizer's BOS) and EOS, cut to
  `data.max_length` at the end.
  """
  name: ClassVar[str] = "lm"

  def examples(self, d, tokenizer, split, limit):
    ds = data.load_split(d.path, split, **data.holdout_of(d))
    out = []
    for i, row in enumerate(ds):
      if limit is not None and i >= limit:
        break
      out.append({"prompt": "", "response": d.template.format(text=data.field(row, d.text_field, "LM data"))})
    return out

  def rows(self, examples, tokenizer, d):
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ex in examples:
      ids = (tokenizer(ex["response"])["input_ids"] + eos)[:d.max_length]
      out.append((np.asarray(ids, np.int32), np.ones(len(ids), np.int32)))
    return out
