"""BitFit: train only bias terms.

Every existing bias trains (GPT-2's linears and LayerNorms). Targeted linears
without a bias (all of Llama's) get a zero one, which the `Linear` hook uses
as soon as it is in the tree:

    self_attn/q_proj/kernel [d, out]   ->   + bias [out]   zeros, trainable
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jft.peft import api


@dataclasses.dataclass(frozen=True)
class BitFit(api.Method):
  name: ClassVar[str] = "bitfit"
  recipe: ClassVar[dict] = {"lr": 1e-3}
  targets: tuple = ("layers/.*",)  # linears that get a zero bias if they lack one

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))

  def is_trainable(self, path):
    return path.rsplit("/", 1)[-1] == "bias"

  def logical_axes(self, path, leaf, base_axes):
    """A bias the model's table does not name (e.g. on lm_head) follows the kernel's output axis."""
    module, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
    kernel = base_axes(module + "/kernel") if module else None
    if leaf != "bias" or kernel is None:
      return None
    return (*kernel[:-2], kernel[-1])

  def init(self, rng, params):
    modules = api.select_modules(self.targets, api.linear_modules(params), self.name)
    additions = {}
    for module in modules:
      node = api.get(params, module)
      if "bias" not in node:
        kernel = node["kernel"]
        additions[module + "/bias"] = jnp.zeros((*api.stacked_shape(kernel), kernel.shape[-1]), jnp.float32)
    return api.with_leaves(params, additions, self.name)

  def merge(self, params, requantize: bool = False):
    return params, {}  # biases are ordinary model weights

  def unmerge(self, merged, detached):
    return merged
