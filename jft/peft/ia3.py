"""IA3: learned scaling vectors on keys, values and the MLP intermediate activation.

Before and after `init` (leading `[L]` under `layers/`):

    self_attn/k_proj/kernel [d, kv]   ->  + ia3/output [kv]    (ones) scales k
    self_attn/v_proj/kernel [d, kv]   ->  + ia3/output [kv]    (ones) scales v
    mlp/down_proj/kernel   [ffn, d]   ->  + ia3/input  [ffn]   (ones) scales act(gate)*up

Feed-forward targets scale the layer's *input* (the intermediate activation),
the others its output (bias included), exactly as peft's IA3 does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jft.core.fields import Names
from jft.peft import api

Leaf = api.Leaf


@dataclasses.dataclass(frozen=True)
class IA3(api.Method):
  name: ClassVar[str] = "ia3"
  group: ClassVar[str] = "ia3"
  leaves: ClassVar[dict] = {"input": Leaf(decay=False, axes=("in",)), "output": Leaf(decay=False, axes=("out",))}
  legacy: ClassVar[tuple] = ((r"/ia3_in$", "/ia3/input"), (r"/ia3_out$", "/ia3/output"))
  recipe: ClassVar[dict] = {"lr": 5e-3}
  peft_type: ClassVar[str] = "IA3"
  targets: tuple = ("k_proj", "v_proj", "down_proj")
  feedforward: tuple = ("down_proj",)  # subset of targets scaled on the input side
  hparam_rules: ClassVar[dict] = {"feedforward": Names(regex=True)}

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "feedforward", tuple(self.feedforward))

  def linear_input(self, p, x, module):
    return x * p["input"].astype(module.dtype) if "input" in p else x

  def linear_final(self, p, y, module):  # after the bias, as peft scales the base layer's whole output
    return y * p["output"].astype(module.dtype) if "output" in p else y

  def init(self, rng, params):
    modules = api.select_modules(self.targets, api.linear_modules(params), self.name)
    ff = set(api.select_modules(self.feedforward, modules, self.name + " feedforward")) \
        if self.feedforward else set()
    additions = {}
    for module in modules:
      kernel = api.get(params, module + "/kernel")
      lead, (d_in, d_out) = api.stacked_shape(kernel), kernel.shape[-2:]
      if module in ff:
        additions[module + "/ia3/input"] = jnp.ones((*lead, d_in), jnp.float32)
      else:
        additions[module + "/ia3/output"] = jnp.ones((*lead, d_out), jnp.float32)
    return api.with_leaves(params, additions, self.name)

  def fold(self, p, kernel, bias):
    if "input" in p:
      return kernel * p["input"][..., :, None], bias, {}
    return kernel * p["output"][..., None, :], None if bias is None else bias * p["output"], {}

  def unfold(self, p, extra, kernel, bias):
    if "input" in p:
      return kernel / p["input"][..., :, None], bias
    return kernel / p["output"][..., None, :], None if bias is None else bias / p["output"]

  def peft_config(self, params):
    modules = self.modules(params)
    ff = [m for m in modules if "input" in api.get(params, m)["ia3"]]
    return {"target_modules": api.module_names(modules), "feedforward_modules": api.module_names(ff),
            "fan_in_fan_out": False, "init_ia3_weights": True}

  @classmethod
  def from_peft_config(cls, cfg):
    return cls(targets=api.peft_targets(cfg), feedforward=tuple(cfg.get("feedforward_modules") or ()))

  def peft_export(self, params, io):
    for module in self.modules(params):
      p = api.get(params, module)["ia3"]
      # peft stores one `ia3_l` per module: (1, in) on the input side, (out, 1) on the output side.
      io.put(module, ".ia3_l", p["input"][..., None, :] if "input" in p else p["output"][..., :, None])

  def peft_import(self, params, io):
    out = {}
    for module in self.modules(params):
      (leaf, like), = api.get(params, module)["ia3"].items()
      shaped = like[..., None, :] if leaf == "input" else like[..., :, None]
      out[f"{module}/ia3/{leaf}"] = io.take(module, ".ia3_l", shaped).reshape(like.shape)
    return out
