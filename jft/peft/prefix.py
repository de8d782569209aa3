"""Prefix tuning: trainable key/value prefixes in every attention layer.

Before and after `init` (n virtual tokens, kvd = kv_heads * head_dim):

    layers/self_attn/q_proj/...   ->  + layers/self_attn/prefix/keys   [L, n, kvd]
                                      + layers/self_attn/prefix/values [L, n, kvd]

The attention hook puts them before every sequence's keys and values. With
`projection=True` the prefixes are produced during training by a
reparameterisation MLP (as in the paper and peft's `prefix_projection`):

    + prefix/encoder/embedding [n, d]
    + prefix/encoder/dense_in/{kernel [d, h], bias [h]}      tanh
    + prefix/encoder/dense_out/{kernel [h, L*2*kvd], bias}

`materialize` turns the encoder into keys/values inside the loss, and
`fold` does it once for inference, leaving a plain prefix tree. In the peft
format the prefix is one `prompt_embeddings [n, L*2*kvd]` tensor.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft.core import rules
from jft.core.fields import Flag, Int
from jft.peft import api

Leaf = api.Leaf
KEYS, VALUES = "layers/self_attn/prefix/keys", "layers/self_attn/prefix/values"


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
  group: ClassVar[str] = "prefix"
  leaves: ClassVar[dict] = {"keys": Leaf(axes=("virtual", "kv_heads")), "values": Leaf(axes=("virtual", "kv_heads")),
                            "encoder": Leaf(axes=None)}  # a small MLP used once per step: replicated
  legacy: ClassVar[tuple] = ((r"layers/self_attn/prefix_k$", "layers/self_attn/prefix/keys"),
                             (r"layers/self_attn/prefix_v$", "layers/self_attn/prefix/values"),
                             (r"(^|/)prefix_encoder/", r"\1prefix/encoder/"))
  recipe: ClassVar[dict] = {"lr": 1e-2, "num_virtual_tokens": 16}
  peft_type: ClassVar[str] = "PREFIX_TUNING"
  init_is_base: ClassVar[bool] = False  # init adds virtual tokens
  num_virtual_tokens: int = 20
  projection: bool = False
  encoder_hidden: int = 512
  hparam_rules: ClassVar[dict] = {"projection": Flag(), "encoder_hidden": Int(1)}

  def attention_prefix(self, p):
    return (p["keys"], p["values"]) if "keys" in p else None

  def init(self, rng, params):
    layers, d, kvd = model_dims(params)
    n = self.num_virtual_tokens
    k1, k2, k3 = jax.random.split(rng, 3)
    if not self.projection:  # peft: an embedding table of [n, L*2*kvd], N(0, 1)
      pk, pv = kv_from_flat(jax.random.normal(k1, (n, layers * 2 * kvd)), layers, kvd)
      return api.with_leaves(params, {KEYS: pk, VALUES: pv}, self.name)
    h = self.encoder_hidden
    lim_in, lim_out = 1 / jnp.sqrt(d), 1 / jnp.sqrt(h)  # torch nn.Linear's default init range
    return api.with_leaves(params, {
        "prefix/encoder/embedding": jax.random.normal(k1, (n, d)),
        "prefix/encoder/dense_in/kernel": jax.random.uniform(k2, (d, h), minval=-lim_in, maxval=lim_in),
        "prefix/encoder/dense_in/bias": jnp.zeros((h,)),
        "prefix/encoder/dense_out/kernel": jax.random.uniform(k3, (h, layers * 2 * kvd), minval=-lim_out,
                                                              maxval=lim_out),
        "prefix/encoder/dense_out/bias": jnp.zeros((layers * 2 * kvd,)),
    }, self.name)

  def materialize(self, params):
    if "prefix" not in params:
      return params
    layers, _, kvd = model_dims(params)
    enc = params["prefix"]["encoder"]
    hidden = jnp.tanh(enc["embedding"] @ enc["dense_in"]["kernel"] + enc["dense_in"]["bias"])
    pk, pv = kv_from_flat(hidden @ enc["dense_out"]["kernel"] + enc["dense_out"]["bias"], layers, kvd)
    rest = {k: v for k, v in params.items() if k != "prefix"}
    return api.with_leaves(rest, {KEYS: pk, VALUES: pv}, self.name)

  def fold(self, params):
    """Inference form: run the reparameterisation once and drop it."""
    return self.materialize(params), dataclasses.replace(self, projection=False)

  def peft_config(self, params):
    layers, _, kvd = model_dims(params)
    return {"num_virtual_tokens": self.num_virtual_tokens, "token_dim": kvd, "num_transformer_submodules": 1,
            "num_layers": layers, "encoder_hidden_size": self.encoder_hidden, "prefix_projection": False}

  @classmethod
  def from_peft_config(cls, cfg):
    return cls(num_virtual_tokens=cfg["num_virtual_tokens"])

  def peft_export(self, params, io):
    flat = rules.flatten(self.materialize(params))
    io.put_global("prompt_embeddings", kv_to_flat(flat[KEYS], flat[VALUES]))

  def peft_import(self, params, io):
    layers, _, kvd = model_dims(params)
    pk, pv = kv_from_flat(jnp.asarray(io.take_global("prompt_embeddings")), layers, kvd)
    return {KEYS: pk, VALUES: pv}
