"""Prefix tuning: trainable key/value prefixes in every attention layer.

Before and after `init` (n virtual tokens, kvd = kv_heads * head_dim):

    layers/self_attn/q_proj/...   ->  + layers/self_attn/prefix_k [L, n, kvd]
                                      + layers/self_attn/prefix_v [L, n, kvd]

With `projection=True` the prefixes are produced during training by a
reparameterisation MLP (as in the paper and peft's `prefix_projection`):

    + prefix_encoder/embedding [n, d]
    + prefix_encoder/dense_in/{kernel [d, h], bias [h]}      tanh
    + prefix_encoder/dense_out/{kernel [h, L*2*kvd], bias}

`materialize` turns the encoder into `prefix_k/prefix_v` inside the loss, and
`fold` does it once for inference, leaving a plain prefix tree.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft import rules
from jft.peft import api


def model_dims(params):
  """(layers, hidden, kv_dim) read off a base tree."""
  k = params["layers"]["self_attn"]["k_proj"]["kernel"]
  return k.shape[0], params["embed_tokens"]["embedding"].shape[-1], k.shape[-1]


def kv_from_flat(flat, layers: int, kvd: int):
  """[n, L*2*kvd] in peft's order (layer, key/value, kv_dim) -> prefix_k, prefix_v [L, n, kvd]."""
  n = flat.shape[0]
  kv = flat.reshape(n, layers, 2, kvd).transpose(2, 1, 0, 3)
  return kv[0], kv[1]


def kv_to_flat(prefix_k, prefix_v):
  """Inverse of kv_from_flat."""
  kv = jnp.stack([prefix_k, prefix_v])  # [2, L, n, kvd]
  return kv.transpose(2, 1, 0, 3).reshape(kv.shape[2], -1)


@dataclasses.dataclass(frozen=True)
class Prefix(api.Method):
  name: ClassVar[str] = "prefix"
  num_virtual_tokens: int = 20
  projection: bool = False
  encoder_hidden: int = 512

  def is_trainable(self, path):
    return path.startswith("prefix_encoder/") or path in ("layers/self_attn/prefix_k", "layers/self_attn/prefix_v")

  def logical_axes(self, path, leaf, base_axes):
    if path.startswith("prefix_encoder/"):
      return api.replicated_axes(leaf)  # a small MLP used once per step
    if path in ("layers/self_attn/prefix_k", "layers/self_attn/prefix_v"):
      return ("layers", "virtual", "kv_heads")
    return None

  def init(self, rng, params):
    layers, d, kvd = model_dims(params)
    n = self.num_virtual_tokens
    k1, k2, k3 = jax.random.split(rng, 3)
    if not self.projection:  # peft: an embedding table of [n, L*2*kvd], N(0, 1)
      pk, pv = kv_from_flat(jax.random.normal(k1, (n, layers * 2 * kvd)), layers, kvd)
      return api.with_leaves(params, {"layers/self_attn/prefix_k": pk, "layers/self_attn/prefix_v": pv}, self.name)
    h = self.encoder_hidden
    lim_in, lim_out = 1 / jnp.sqrt(d), 1 / jnp.sqrt(h)  # torch nn.Linear's default init range
    return api.with_leaves(params, {
        "prefix_encoder/embedding": jax.random.normal(k1, (n, d)),
        "prefix_encoder/dense_in/kernel": jax.random.uniform(k2, (d, h), minval=-lim_in, maxval=lim_in),
        "prefix_encoder/dense_in/bias": jnp.zeros((h,)),
        "prefix_encoder/dense_out/kernel": jax.random.uniform(k3, (h, layers * 2 * kvd), minval=-lim_out,
                                                              maxval=lim_out),
        "prefix_encoder/dense_out/bias": jnp.zeros((layers * 2 * kvd,)),
    }, self.name)

  def materialize(self, params):
    if "prefix_encoder" not in params:
      return params
    layers, _, kvd = model_dims(params)
    enc = params["prefix_encoder"]
    hidden = jnp.tanh(enc["embedding"] @ enc["dense_in"]["kernel"] + enc["dense_in"]["bias"])
    pk, pv = kv_from_flat(hidden @ enc["dense_out"]["kernel"] + enc["dense_out"]["bias"], layers, kvd)
    rest = {k: v for k, v in params.items() if k != "prefix_encoder"}
    return api.with_leaves(rest, {"layers/self_attn/prefix_k": pk, "layers/self_attn/prefix_v": pv}, self.name)

  def fold(self, params):
    """Inference form: run the reparameterisation once and drop it."""
    return self.materialize(params), dataclasses.replace(self, projection=False)


def prefix_flat(params):
  """The prefix as peft stores it: [n, L*2*kvd]."""
  attn = rules.flatten(params)
  return kv_to_flat(attn["layers/self_attn/prefix_k"], attn["layers/self_attn/prefix_v"])
