"""Bottleneck adapters: Houlsby (after attention and after the MLP) and Pfeiffer (after the MLP).

Before and after `init` (d = hidden size, m = bottleneck size, leading `[L]`):

    layers/self_attn/...    ->   layers/self_attn/bottleneck/{down [d, m], down_bias [m],   (Houlsby only)
                                                               up [m, d], up_bias [d]}
    layers/mlp/...          ->   layers/mlp/bottleneck/...

At the sublayer-output hook a sublayer's output h becomes h + up(act(down(h)))
before the residual add. `up` starts at zero, so the model starts as the base.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft.models.layers import ACTIVATIONS
from jft.core.fields import Choice, Int
from jft.peft import api

Leaf = api.Leaf
SITES = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}


@dataclasses.dataclass(frozen=True)
class Bottleneck(api.Method):
  name: ClassVar[str] = "bottleneck"
  aliases: ClassVar[tuple] = ("adapters",)
  group: ClassVar[str] = "bottleneck"
  leaves: ClassVar[dict] = {"down": Leaf(axes=("embed", "adapter")), "down_bias": Leaf(decay=False, axes=("adapter",)),
                            "up": Leaf(axes=("adapter", "embed")), "up_bias": Leaf(decay=False, axes=("embed",))}
  legacy: ClassVar[tuple] = (
      (r"layers/adapter_attn/(down|up)/kernel$", r"layers/self_attn/bottleneck/\1"),
      (r"layers/adapter_attn/(down|up)/bias$", r"layers/self_attn/bottleneck/\1_bias"),
      (r"layers/adapter_mlp/(down|up)/kernel$", r"layers/mlp/bottleneck/\1"),
      (r"layers/adapter_mlp/(down|up)/bias$", r"layers/mlp/bottleneck/\1_bias"),
  )
  recipe: ClassVar[dict] = {"lr": 5e-4, "size": 32}
  style: str = "houlsby"
  size: int = 64
  activation: str = "relu"
  init_std: float = 1e-2  # `down` ~ N(0, init_std); `up` = 0: near-identity
  hparam_rules: ClassVar[dict] = {"style": Choice(lambda: sorted(SITES)), "size": Int(1),
                                  "activation": Choice(lambda: sorted(ACTIVATIONS))}

  def __post_init__(self):
    if self.style not in SITES:
      raise api.MethodError(f"{self.name}: style={self.style!r}; expected one of {sorted(SITES)}")
    if self.activation not in ACTIVATIONS:
      raise api.MethodError(f"{self.name}: activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}")

  def sublayer_output(self, p, h, module):
    dt = module.dtype
    z = ACTIVATIONS[self.activation](jnp.dot(h, p["down"].astype(dt)) + p["down_bias"].astype(dt))
    return h + jnp.dot(z, p["up"].astype(dt)) + p["up_bias"].astype(dt)

  def init(self, rng, params):
    layers = params["layers"]["input_layernorm"]["scale"].shape[:-1]
    d = params["embed_tokens"]["embedding"].shape[-1]
    additions = {}
    for i, site in enumerate(SITES[self.style]):
      key = jax.random.fold_in(rng, i)
      additions.update({
          f"layers/{site}/bottleneck/down": self.init_std * jax.random.normal(key, (*layers, d, self.size)),
          f"layers/{site}/bottleneck/down_bias": jnp.zeros((*layers, self.size), jnp.float32),
          f"layers/{site}/bottleneck/up": jnp.zeros((*layers, self.size, d), jnp.float32),
          f"layers/{site}/bottleneck/up_bias": jnp.zeros((*layers, d), jnp.float32),
      })
    return api.with_leaves(params, additions, self.name)
