"""Full fine-tuning, and training chosen existing leaves (norms, embeddings).

No leaves are added; the predicate alone decides:

    trainable = matches a `train` rule and no `freeze` rule    (full paths, full match)

`Full()` trains everything; `Full(freeze=("embed_tokens/.*",))` keeps the
embeddings frozen; `Full(train=(".*norm/.*",))` composed with LoRA trains the
norms beside the adapters.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jft.core import rules
from jft.peft import api


@dataclasses.dataclass(frozen=True)
class Full(api.Method):
  name: ClassVar[str] = "full"
  recipe: ClassVar[dict] = {"lr": 1e-5}
  train: tuple = (".*",)
  freeze: tuple = ()

  def __post_init__(self):
    object.__setattr__(self, "train", tuple(self.train))
    object.__setattr__(self, "freeze", tuple(self.freeze))

  def is_trainable(self, path):
    if rules.match([(r, True) for r in self.freeze], path, default=False):
      return False
    return rules.match([(r, True) for r in self.train], path, default=False)

  def init(self, rng, params):
    # Only validation: every rule must select something (typos fail here, named).
    paths = list(rules.flatten(params))
    rules.assign([(r, True) for r in self.train], paths, default=False, what="full train rule")
    if self.freeze:
      rules.assign([(r, True) for r in self.freeze], paths, default=False, what="full freeze rule")
    return params

  def merge(self, params, requantize: bool = False):
    return params, {}  # the trained weights are the model

  def unmerge(self, merged, detached):
    return merged
