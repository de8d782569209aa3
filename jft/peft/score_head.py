"""A scalar (or n-way) head on the final hidden state, trained beside a method: a reward model's head.

    score/kernel [d, outputs]     normal(0, 0.02), trainable (HF's `score` layer, transposed)

It is not a fine-tuning method to pick by name (`standalone = False`): the
reward objective adds it to the configured method (`Compose`), so it is
checkpointed, counted and exported with the adapter. In the `peft` format it
is what `modules_to_save=["score"]` writes for a sequence-classification
model (`base_model.model.score.weight`, [outputs, d]), with `task_type` SEQ_CLS.
Merging leaves it as it is: the head is part of the merged model.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft.core.fields import Int
from jft.peft import api
from jft.peft.peft_format import PREFIX

HF_NAME = "score"


@dataclasses.dataclass(frozen=True)
class ScoreHead(api.Method):
  name: ClassVar[str] = "score_head"
  group: ClassVar[str] = "score"
  standalone: ClassVar[bool] = False
  leaves: ClassVar[dict] = {"kernel": api.Leaf(trainable=True, decay=True)}
  peft_module: ClassVar[str] = HF_NAME
  outputs: int = 1
  hparam_rules: ClassVar[dict] = {"outputs": Int(1)}

  def init(self, rng, params):
    d = params["embed_tokens"]["embedding"].shape[-1]
    kernel = 0.02 * jax.random.normal(rng, (d, self.outputs), jnp.float32)
    return api.with_leaves(params, {"score/kernel": kernel}, self.name)

  def merge(self, params, requantize: bool = False):
    return params, {}

  def unmerge(self, merged, detached):
    return merged

  def peft_export(self, params, io):
    io.put_global(PREFIX + HF_NAME + ".weight", api.get(params, "score/kernel").T)

  def peft_import(self, params, io):
    return {"score/kernel": io.take_global(PREFIX + HF_NAME + ".weight").T}


def scores(hidden, attention_mask, kernel):
  """[B, outputs] head outputs at each row's last real token (right padding: `attention_mask` sum - 1),
  in float32 as HF's sequence classifier pools them."""
  last = (attention_mask != 0).sum(-1) - 1
  h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  return h.astype(jnp.float32) @ kernel.astype(jnp.float32)
