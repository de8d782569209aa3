"""Prompt tuning and P-tuning: n virtual tokens prepended to the input.

Prompt tuning, before and after `init`:

    embed_tokens/embedding [V, d]   ->   + prompt/embeddings [n, d]   trainable

P-tuning trains a small prompt encoder instead, and `materialize` computes
`prompt/embeddings` from it inside the loss (peft's PromptEncoder layout):

    + ptuning/embedding [n, d]
    + ptuning/mlp/dense_{0,1,2}/{kernel, bias}      d -> h -> h -> d, ReLU   ("mlp")
    or
    + ptuning/lstm/l{0,1}_{fwd,bwd}/{w_ih, w_hh, b}  bidirectional 2-layer LSTM (h)
    + ptuning/mlp/dense_{0,1}/{kernel, bias}        2h -> 2h -> d, ReLU      ("lstm")

The model's input hook prepends the prompt vectors; their logits are dropped.
Both export to peft as PROMPT_TUNING (P-tuning saves its encoder's output).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jft.core import rules
from jft.core.fields import Choice, Int, TokenIds
from jft.peft import api

Leaf = api.Leaf
PROMPT = "prompt/embeddings"


@dataclasses.dataclass(frozen=True)
class PromptTuning(api.Method):
  name: ClassVar[str] = "prompt"
  group: ClassVar[str] = "prompt"
  leaves: ClassVar[dict] = {"embeddings": Leaf(decay=False, axes=("virtual", "embed"))}
  legacy: ClassVar[tuple] = ((r"(^|/)prompt_embeddings$", r"\1prompt/embeddings"),)
  recipe: ClassVar[dict] = {"lr": 1e-2, "num_virtual_tokens": 16}
  peft_type: ClassVar[str] = "PROMPT_TUNING"
  init_is_base: ClassVar[bool] = False  # init adds virtual tokens
  num_virtual_tokens: int = 20
  init_from: str = "vocab"  # "random" N(0,1) as peft | "vocab" sampled rows | "text" rows of init_token_ids
  init_token_ids: Optional[tuple] = None  # token ids of an initialisation text (repeated to n)
  hparam_rules: ClassVar[dict] = {"init_from": Choice(("random", "vocab", "text")), "init_token_ids": TokenIds()}

  def __post_init__(self):
    if self.init_from not in ("random", "vocab", "text"):
      raise api.MethodError(f"prompt: init_from={self.init_from!r}; expected random, vocab or text")
    if self.init_from == "text" and not self.init_token_ids:
      raise api.MethodError("prompt: init_from='text' needs init_token_ids (the tokenized text)")
    if self.init_token_ids is not None:
      object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))

  def input_prefix(self, p):
    return p.get("embeddings")

  def init(self, rng, params):
    return api.with_leaves(params, {PROMPT: self._initial(rng, params)}, self.name)

  def peft_config(self, params):
    d = params["embed_tokens"]["embedding"].shape[-1]
    return {"num_virtual_tokens": self.num_virtual_tokens, "token_dim": d, "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM"}

  @classmethod
  def from_peft_config(cls, cfg):
    return cls(num_virtual_tokens=cfg["num_virtual_tokens"], init_from="random")

  def peft_export(self, params, io):
    io.put_global("prompt_embeddings", rules.flatten(self.materialize(params))[PROMPT])

  def peft_import(self, params, io):
    return {PROMPT: io.take_global("prompt_embeddings")}

  def _initial(self, rng, params):
    table = params["embed_tokens"]["embedding"]
    n, d = self.num_virtual_tokens, table.shape[-1]
    if self.init_from == "random":
      return jax.random.normal(rng, (n, d), jnp.float32)
    if self.init_from == "vocab":
      ids = jax.random.randint(rng, (n,), 0, table.shape[0])
    else:  # as peft: repeat the text's tokens to n, then truncate
      ids = jnp.asarray(np.resize(np.asarray(self.init_token_ids), n))
    return api.f32(table[ids])


@dataclasses.dataclass(frozen=True)
class PTuning(api.Method):
  name: ClassVar[str] = "ptuning"
  group: ClassVar[str] = "ptuning"
  leaves: ClassVar[dict] = {"embedding": Leaf(axes=None), "mlp": Leaf(axes=None), "lstm": Leaf(axes=None)}
  legacy: ClassVar[tuple] = ((r"(^|/)prompt_encoder/", r"\1ptuning/"),)
  recipe: ClassVar[dict] = {"lr": 1e-3, "num_virtual_tokens": 16}
  peft_type: ClassVar[str] = "PROMPT_TUNING"  # exported as the prompt its encoder makes
  init_is_base: ClassVar[bool] = False  # init adds virtual tokens
  num_virtual_tokens: int = 20
  encoder: str = "mlp"  # "mlp" | "lstm"
  encoder_hidden: int = 128
  hparam_rules: ClassVar[dict] = {"encoder": Choice(("mlp", "lstm")), "encoder_hidden": Int(1)}

  def __post_init__(self):
    if self.encoder not in ("mlp", "lstm"):
      raise api.MethodError(f"ptuning: encoder={self.encoder!r}; expected mlp or lstm")

  def init(self, rng, params):
    d = params["embed_tokens"]["embedding"].shape[-1]
    h = self.encoder_hidden
    keys = iter(jax.random.split(rng, 32))
    leaves = {"ptuning/embedding": jax.random.normal(next(keys), (self.num_virtual_tokens, d))}
    dims = [(d, h), (h, h), (h, d)] if self.encoder == "mlp" else [(2 * h, 2 * h), (2 * h, d)]
    for i, (a, b) in enumerate(dims):
      leaves.update(_linear(next(keys), a, b, f"ptuning/mlp/dense_{i}"))
    if self.encoder == "lstm":
      for layer, d_in in enumerate((d, 2 * h)):
        for direction in ("fwd", "bwd"):
          lim = 1 / np.sqrt(h)  # torch's LSTM init: U(+-1/sqrt(h)) everywhere
          u = lambda shape: jax.random.uniform(next(keys), shape, minval=-lim, maxval=lim)
          base = f"ptuning/lstm/l{layer}_{direction}"
          leaves.update({f"{base}/w_ih": u((d_in, 4 * h)), f"{base}/w_hh": u((h, 4 * h)),
                         f"{base}/b": u((4 * h,)) + u((4 * h,))})
    return api.with_leaves(params, leaves, self.name)

  def materialize(self, params):
    if "ptuning" not in params:
      return params
    enc = params["ptuning"]
    x = enc["embedding"]
    if self.encoder == "lstm":
      for layer in range(2):
        fwd = _lstm(enc["lstm"][f"l{layer}_fwd"], x)
        bwd = _lstm(enc["lstm"][f"l{layer}_bwd"], x[::-1])[::-1]
        x = jnp.concatenate([fwd, bwd], axis=-1)
    mlp = enc["mlp"]
    n = len(mlp)
    for i in range(n):
      x = x @ mlp[f"dense_{i}"]["kernel"] + mlp[f"dense_{i}"]["bias"]
      if i < n - 1:
        x = jax.nn.relu(x)
    rest = {k: v for k, v in params.items() if k != "ptuning"}
    return api.with_leaves(rest, {PROMPT: x}, self.name)

  def fold(self, params):
    """Inference form: compute the virtual tokens once; a plain prompt-tuning tree."""
    return self.materialize(params), PromptTuning(self.num_virtual_tokens)

  def peft_config(self, params):
    return PromptTuning(self.num_virtual_tokens).peft_config(params)

  def peft_export(self, params, io):
    PromptTuning(self.num_virtual_tokens).peft_export(self.materialize(params), io)


def _linear(key, d_in, d_out, prefix):
  lim = 1 / np.sqrt(d_in)
  k1, k2 = jax.random.split(key)
  return {f"{prefix}/kernel": jax.random.uniform(k1, (d_in, d_out), minval=-lim, maxval=lim),
          f"{prefix}/bias": jax.random.uniform(k2, (d_out,), minval=-lim, maxval=lim)}


def _lstm(p, xs):
  """One LSTM direction over a sequence [n, d_in] -> [n, h] (torch gate order i, f, g, o)."""
  h_size = p["w_hh"].shape[0]

  def step(carry, x):
    h, c = carry
    i, f, g, o = jnp.split(x @ p["w_ih"] + h @ p["w_hh"] + p["b"], 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((h_size,), xs.dtype)
  return jax.lax.scan(step, (zeros, zeros), xs)[1]
