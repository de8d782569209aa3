"""Bottleneck adapters: Houlsby (after attention and after the MLP) and Pfeiffer (after the MLP).

Before and after `init` (d = hidden size, m = bottleneck, leading `[L]`):

    layers/self_attn/...            layers/self_attn/...
    layers/mlp/...          ->      layers/adapter_attn/down/{kernel [d, m], bias [m]}   (Houlsby only)
                                    layers/adapter_attn/up/{kernel [m, d], bias [d]}
                                    layers/adapter_mlp/down/..., up/...

The block's `Adapter` hook maps a sublayer output h to h + up(act(down(h)))
before the residual add. `up` starts at zero, so the model starts as the base.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft.models.layers import ACTIVATIONS, Hooks
from jft.peft import api

SITES = {"houlsby": ("adapter_attn", "adapter_mlp"), "pfeiffer": ("adapter_mlp",)}


@dataclasses.dataclass(frozen=True)
class Adapters(api.Method):
  name: ClassVar[str] = "adapters"
  style: str = "houlsby"
  size: int = 64
  activation: str = "relu"
  init_std: float = 1e-2  # `down` ~ N(0, init_std); `up` = 0: near-identity

  def __post_init__(self):
    if self.style not in SITES:
      raise api.MethodError(f"adapters: style={self.style!r}; expected one of {sorted(SITES)}")
    if self.activation not in ACTIVATIONS:
      raise api.MethodError(f"adapters: activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}")

  def is_trainable(self, path):
    return path.startswith(("layers/adapter_attn/", "layers/adapter_mlp/"))

  def logical_axes(self, path, leaf, base_axes):
    if not self.is_trainable(path):
      return None
    return {"down/kernel": ("layers", "embed", "adapter"), "down/bias": ("layers", "adapter"),
            "up/kernel": ("layers", "adapter", "embed"), "up/bias": ("layers", "embed")}[path.split("/", 2)[2]]

  def configure(self, model):
    return model.clone(hooks=dataclasses.replace(model.hooks or Hooks(), adapter_activation=self.activation))

  def init(self, rng, params):
    layers = params["layers"]["input_layernorm"]["scale"].shape[:-1]
    d = params["embed_tokens"]["embedding"].shape[-1]
    additions = {}
    for i, site in enumerate(SITES[self.style]):
      key = jax.random.fold_in(rng, i)
      additions.update({
          f"layers/{site}/down/kernel": self.init_std * jax.random.normal(key, (*layers, d, self.size)),
          f"layers/{site}/down/bias": jnp.zeros((*layers, self.size), jnp.float32),
          f"layers/{site}/up/kernel": jnp.zeros((*layers, self.size, d), jnp.float32),
          f"layers/{site}/up/bias": jnp.zeros((*layers, d), jnp.float32),
      })
    return api.with_leaves(params, additions, self.name)
