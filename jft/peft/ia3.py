"""IA3: learned scaling vectors on keys, values and the MLP intermediate activation.

Before and after `init` (leading `[L]` under `layers/`):

    self_attn/k_proj/kernel [d, kv]     ->  + ia3_out [kv]     (ones) scales k
    self_attn/v_proj/kernel [d, kv]     ->  + ia3_out [kv]     (ones) scales v
    mlp/down_proj/kernel   [ffn, d]     ->  + ia3_in  [ffn]    (ones) scales act(gate)*up

Feed-forward targets scale the layer's *input* (the intermediate activation),
the others its output (bias included), exactly as peft's IA3 does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jft import rules
from jft.peft import api


@dataclasses.dataclass(frozen=True)
class IA3(api.Method):
  name: ClassVar[str] = "ia3"
  targets: tuple = ("k_proj", "v_proj", "down_proj")
  feedforward: tuple = ("down_proj",)  # subset of targets scaled on the input side

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "feedforward", tuple(self.feedforward))

  def is_trainable(self, path):
    return path.rsplit("/", 1)[-1] in ("ia3_in", "ia3_out")

  def logical_axes(self, path, leaf, base_axes):
    kernel = api.module_axes(path, base_axes)
    name = path.rsplit("/", 1)[-1]
    if name not in ("ia3_in", "ia3_out") or kernel is None:
      return None
    return (*kernel[:-2], kernel[-2] if name == "ia3_in" else kernel[-1])

  def init(self, rng, params):
    modules = api.select_modules(self.targets, api.linear_modules(params), self.name)
    ff = set(api.select_modules(self.feedforward, modules, self.name + " feedforward")) \
        if self.feedforward else set()
    additions = {}
    for module in modules:
      kernel = api.get(params, module + "/kernel")
      lead, (d_in, d_out) = api.stacked_shape(kernel), kernel.shape[-2:]
      if module in ff:
        additions[module + "/ia3_in"] = jnp.ones((*lead, d_in), jnp.float32)
      else:
        additions[module + "/ia3_out"] = jnp.ones((*lead, d_out), jnp.float32)
    return api.with_leaves(params, additions, self.name)

  def merge(self, params):
    flat = rules.flatten(params)
    adapter = {}
    for path in [p for p in flat if p.endswith(("/ia3_in", "/ia3_out"))]:
      module, leaf = path.rsplit("/", 1)
      scale = flat.pop(path)
      adapter[path] = scale
      kernel = flat[module + "/kernel"]
      if leaf == "ia3_in":
        flat[module + "/kernel"] = (api.f32(kernel) * scale[..., :, None]).astype(kernel.dtype)
      else:
        flat[module + "/kernel"] = (api.f32(kernel) * scale[..., None, :]).astype(kernel.dtype)
        if module + "/bias" in flat:
          flat[module + "/bias"] = (api.f32(flat[module + "/bias"]) * scale).astype(flat[module + "/bias"].dtype)
    return rules.unflatten(flat), rules.unflatten(adapter)

  def unmerge(self, merged, adapter):
    flat, add = rules.flatten(merged), rules.flatten(adapter)
    for path, scale in add.items():
      module, leaf = path.rsplit("/", 1)
      kernel = flat[module + "/kernel"]
      if leaf == "ia3_in":
        flat[module + "/kernel"] = (api.f32(kernel) / scale[..., :, None]).astype(kernel.dtype)
      else:
        flat[module + "/kernel"] = (api.f32(kernel) / scale[..., None, :]).astype(kernel.dtype)
        if module + "/bias" in flat:
          flat[module + "/bias"] = (api.f32(flat[module + "/bias"]) / scale).astype(flat[module + "/bias"].dtype)
      flat[path] = scale
    return rules.unflatten(flat)
