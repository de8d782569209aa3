"""Building blocks and the hook points that PEFT methods plug into.

Models know no particular fine-tuning method. They read whatever the param
tree holds at a few fixed places (see ../shared/DESIGN.md):

* `Linear`: every projection. A dense `kernel` `[in, out]`, and whatever of
  these the tree holds beside it:
    `bias [out]`                      used whenever present (BitFit adds zero biases);
    `lora_a [in, r]`, `lora_b [r, out]`, `lora_scale []`
                                      y += scale * dropout(x) @ a @ b;
    `lora_magnitude [out]`            DoRA: rescale columns of W + scale*a@b to this norm;
    `ia3_in [in]`, `ia3_out [out]`    IA3: scale the input / the output.
* `Embed`: token (and learned position) tables; `attend` gives tied logits.

Norms and rotary embeddings live here too because every family shares them.
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

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Hooks:
  """Static settings of the hook points that cannot live in the param tree.

  Numbers that can (LoRA scale) are leaves beside their weights, so a tree
  always computes what it says. These are the rest: train-time switches and
  the adapter nonlinearity. A method sets them with `method.configure(model)`.
  """
  lora_dropout: float = 0.0
  adapter_activation: str = "relu"
  deterministic: bool = True  # False during training: enables dropout
  # `jft.sharding.ActivationSharding` (or None): pins activations to mesh axes by
  # logical name at layer boundaries; set by whoever runs the model on a mesh.
  sharding: Any = None


def constrain(x, hooks: "Hooks", axes):
  """Pin an activation's sharding by logical axis names; a no-op without a mesh."""
  if hooks is None or hooks.sharding is None:
    return x
  return hooks.sharding(x, axes)


class Linear(nn.Module):
  """y = x @ kernel (+ bias), plus the optional method leaves listed above.

  Kernel layout is Flax's `[in, out]`; it may be a `quant.QuantizedTensor`
  (QLoRA), dequantized right before the matmul. Method leaves are only read,
  never created: `init` of a base model makes the base tree, methods add the rest.
  """
  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  hooks: "Hooks" = None

  def _opt(self, name):
    return self.get_variable("params", name) if self.has_variable("params", name) else None

  @nn.compact
  def __call__(self, x):
    kernel = self._opt("kernel")
    if not quant.is_quantized(kernel):  # dense kernels go through param() for its shape check
      kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    ia3_in, ia3_out = self._opt("ia3_in"), self._opt("ia3_out")
    if ia3_in is not None:
      x = x * ia3_in.astype(self.dtype)
    if quant.is_quantized(kernel):  # QLoRA base: dequantized right here, never stored dense
      y = quant.matmul(x, kernel, self.dtype)
    else:
      y = jnp.dot(x, kernel.astype(self.dtype))
    lora_a = self._opt("lora_a")
    if lora_a is not None:
      lora_b, scale = self.get_variable("params", "lora_b"), self.get_variable("params", "lora_scale")
      xd = x
      rate = self.hooks.lora_dropout if self.hooks else 0.0
      if rate > 0 and not self.hooks.deterministic:
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
        xd = jnp.where(keep, x / (1.0 - rate), 0).astype(self.dtype)
      delta = jnp.dot(jnp.dot(xd, lora_a.astype(self.dtype)), lora_b.astype(self.dtype))
      delta = delta * scale.astype(self.dtype)
      magnitude = self._opt("lora_magnitude")
      if magnitude is None:
        y = y + delta
      else:
        # DoRA: W' = m * V / ||V|| with V = W + scale*a@b, norm per output column and
        # treated as a constant in the backward pass (as the paper and peft do).
        v = quant.as_dense(kernel) + scale * jnp.dot(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32))
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=0)))
        factor = (magnitude.astype(jnp.float32) / norm).astype(self.dtype)
        y = factor * (y + delta)
    if self.use_bias or self.has_variable("params", "bias"):
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if ia3_out is not None:  # after the bias, as peft scales the base layer's whole output
      y = y * ia3_out.astype(self.dtype)
    return y


class Adapter(nn.Module):
  """Bottleneck adapter hook: h + up(act(down(h))) when the tree has `down`/`up`.

  Leaves: `down/kernel [d, m]`, `down/bias [m]`, `up/kernel [m, d]`, `up/bias [d]`.
  Absent leaves make it the identity (and `init` of a base model creates none).
  """
  hooks: Hooks = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    if not self.has_variable("params", "down"):
      return h
    down, up = self.get_variable("params", "down"), self.get_variable("params", "up")
    act = ACTIVATIONS[self.hooks.adapter_activation if self.hooks else "relu"]
    z = act(jnp.dot(h, down["kernel"].astype(self.dtype)) + down["bias"].astype(self.dtype))
    return h + jnp.dot(z, up["kernel"].astype(self.dtype)) + up["bias"].astype(self.dtype)


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
    return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


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
