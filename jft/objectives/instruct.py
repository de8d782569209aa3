"""Instruction tuning: Alpaca-style instruction/input/output rows, loss on the output.

The prompt is Alpaca's (with or without its "### Input:" block) or, with
`data.chat`, the model's chat template. A single data file (LLaMA-Factory's
`alpaca_en_demo.json`, fetched by `scripts/fetch_llamafactory_data.py`; CC
BY-NC 4.0, non-commercial) is split by `data.holdout`. Evaluation reports the
held-out responses' loss and perplexity; `samples` greedy-decodes a few
held-out prompts, which the run's summary shows before and after training.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jft.data import preference as pd
from jft.models.generate import Sampling, generate, stop_token_ids
from jft.core.fields import Int
from jft.objectives import api, language


@dataclasses.dataclass(frozen=True)
class Instruct(language.SFT):
  name: ClassVar[str] = "instruct"
  samples_shown: int = 3  # held-out generations in the summary, before and after
  max_new_tokens: int = 64
  hparam_rules: ClassVar[dict] = {"samples_shown": Int(0), "max_new_tokens": Int(1)}

  def examples(self, d, tokenizer, split, limit):
    rows = pd.split_of(d.path, split, train_split=d.train_split, holdout=d.holdout, seed=0)
    return pd.instruction_examples(rows, tokenizer, template="chat" if d.chat else "alpaca", limit=limit,
                                   system=d.system, where=f"{d.path} ({split})")

  def samples(self, config, forward: api.Forward, tokenizer, examples) -> list[dict]:
    return greedy_samples(forward, tokenizer, examples[:self.samples_shown], config.data.chat, self.max_new_tokens)


def greedy_samples(forward: api.Forward, tokenizer, examples, chat: bool, max_new_tokens: int) -> list[dict]:
  """[{"prompt", "reference", "generated"}]: greedy continuations of the examples' prompts."""
  if not examples:
    return []
  prompts = [tokenizer(ex["prompt"], add_special_tokens=not chat)["input_ids"] for ex in examples]
  out = generate(forward.model, forward.params, prompts, Sampling(max_new_tokens=max_new_tokens),
                 stop_tokens=stop_token_ids(forward.model, tokenizer),
                 pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                 progress_desc="samples (tokens)")
  return [{"prompt": ex["prompt"], "reference": ex.get("response", ""),
           "generated": tokenizer.decode(o, skip_special_tokens=True).strip()} for ex, o in zip(examples, out)]
