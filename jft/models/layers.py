"""Building blocks shared by every model family.

`Linear` is every projection: a dense `kernel [in, out]` (or a quantized one,
dequantized right before the matmul), a `bias [out]` whenever the tree holds
one (BitFit adds zero biases), and the hook points of `jft.models.hooks` for
any method group beside them (`lora`, `ia3`, ...). `Embed` holds token (and
learned position) tables; `attend` gives tied logits. Norms and rotary
embeddings live here too because every family shares them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft import quant
from jft.models import hooks

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static settings of a model run that cannot live in the param tree (hashable: a jit key).

  Numbers that can (LoRA's scale) are leaves beside their weights, so a tree
  always computes what it says. These are the rest: the configured methods
  whose hooks carry settings (dropout, activation), the train-time switch,
  how activations are pinned to a mesh, and which attention implementation runs.
  """
  methods: tuple = ()  # configured `jft.models.hooks.Hook`s; `method.configure(model)` adds itself
  deterministic: bool = True  # False during training: enables dropout
  # `jft.models.sharding.ActivationSharding` (or None): pins activations to mesh axes by
  # logical name at layer boundaries; set by whoever runs the model on a mesh.
  sharding: Any = None
  # How attention runs (`jft.models.attention.IMPLEMENTATIONS`: auto, xla, cudnn, pallas): `model.attention`.
  attention: str = "auto"

  def hook(self, group: str) -> hooks.Hook:
    """The hook that runs `group`'s leaves: the configured method, else the registered default."""
    for method in self.methods:
      if method.group == group:
        return method
    return hooks.default(group)

  def with_method(self, method) -> "Settings":
    rest = tuple(m for m in self.methods if m.group != method.group)
    return dataclasses.replace(self, methods=(*rest, method))


def constrain(x, settings: "Settings", axes):
  """Pin an activation's sharding by logical axis names; a no-op without a mesh."""
  if settings is None or settings.sharding is None:
    return x
  return settings.sharding(x, axes)


class Linear(nn.Module):
  """y = x @ kernel (+ bias), with the hooks of the method groups beside the kernel.

  Kernel layout is Flax's `[in, out]`; it may be a `quant.QuantizedTensor`
  (QLoRA), dequantized right before the matmul. Method leaves are only read,
  never created: `init` of a base model makes the base tree, methods add the rest.
  """
  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  settings: "Settings" = Settings()

  @nn.compact
  def __call__(self, x):
    kernel = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
    if not quant.is_quantized(kernel):  # dense kernels go through param() for its shape check
      kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    methods = hooks.groups(self, base=("kernel", "bias"), strict=True)
    # Tokens on one axis: the weight gradients (x^T g) then contract a single
    # axis, which XLA:CPU lowers without materialising transposed copies of the
    # large [tokens, features] operands (contracting batch and length together
    # cost 30-40% of the backward pass).
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    for hook, p in methods:
      x = hook.linear_input(p, x, self)
    if quant.is_quantized(kernel):  # QLoRA base: dequantized right here, never stored dense
      y = quant.matmul(x, kernel, self.dtype)
    else:
      y = jnp.dot(x, kernel.astype(self.dtype))
    for hook, p in methods:
      y = hook.linear_output(p, x, y, kernel, self)
    if self.use_bias or self.has_variable("params", "bias"):
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    for hook, p in methods:
      y = hook.linear_final(p, y, self)
    return y.reshape(*lead, y.shape[-1])


def dropout(module, x, rate: float):
  """Inverted dropout with the module's `dropout` rng, only when the run is not deterministic."""
  if rate <= 0 or module.settings.deterministic:
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Embed(nn.Module):
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", nn.initializers.normal(0.02),
                                (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids):
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x):
    """Tied output projection: logits = x @ embedding.T."""
    flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)  # one token axis, as in `Linear`
    return jnp.dot(flat, self.embedding.astype(self.dtype).T).reshape(*x.shape[:-1], self.num_embeddings)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    # Normalise in float32 like transformers, then cast back before scaling.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nn.Module):
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def make_norm(config, dtype, param_dtype, name):
  if config.norm == "rms":
    return RMSNorm(config.norm_eps, dtype, param_dtype, name=name)
  return LayerNorm(config.norm_eps, dtype, param_dtype, name=name)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


# ----------------------------------------------------------------------------
# Rotary position embeddings (the "rotate half" layout used by HF checkpoints).
# ----------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
  """Inverse frequencies, with the rope scaling types HF Llama configs use."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv_freq.astype(np.float32)
  if kind == "linear":
    return (inv_freq / scaling["factor"]).astype(np.float32)
  if kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise NotImplementedError(
      f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def rope_cos_sin(positions, inv_freq):
  """positions [B, T] -> cos, sin [B, T, head_dim] in float32."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [B, T, heads, head_dim]; cos/sin [B, T, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin
