"""LoRA and its variants: rsLoRA, PiSSA initialisation, DoRA.

Param tree of one targeted linear, before and after `init` (leading `[L]`
on everything under `layers/`, the scanned layer axis):

    q_proj/                              q_proj/
      kernel [in, out]        ->           kernel [in, out]          frozen (PiSSA: residual)
                                           lora_a [in, r]            trainable, f32
                                           lora_b [r, out]           trainable, f32, zeros
                                           lora_scale []             frozen constant alpha/r
                                           lora_magnitude [out]      trainable (DoRA only)

The model's `Linear` hook computes `x @ kernel + scale * x @ a @ b`; DoRA
rescales each output column of `kernel + scale * a @ b` to `lora_magnitude`,
with the column norm treated as a constant in the backward pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft import quant, rules
from jft.models.layers import Hooks
from jft.peft import api

LORA_LEAVES = ("lora_a", "lora_b", "lora_scale", "lora_magnitude")


@dataclasses.dataclass(frozen=True)
class LoRA(api.Method):
  name: ClassVar[str] = "lora"
  constants: ClassVar[tuple] = ("lora_scale",)
  targets: tuple = ("q_proj", "v_proj")
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
  init_a: str = "kaiming"  # "kaiming" (peft's default) | "gaussian" (std 1/r) | "pissa"
  dora: bool = False

  def __post_init__(self):
    if self.rank < 1:
      raise api.MethodError(f"{self.name}: rank must be >= 1, got {self.rank}")
    if self.init_a not in ("kaiming", "gaussian", "pissa"):
      raise api.MethodError(f"{self.name}: init_a={self.init_a!r}; expected kaiming, gaussian or pissa")
    if not 0 <= self.dropout < 1:
      raise api.MethodError(f"{self.name}: dropout must be in [0, 1), got {self.dropout}")
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def is_trainable(self, path):
    leaf = path.rsplit("/", 1)[-1]
    return leaf in ("lora_a", "lora_b") or (self.dora and leaf == "lora_magnitude")

  def configure(self, model):
    return model.clone(hooks=dataclasses.replace(model.hooks or Hooks(), lora_dropout=self.dropout))

  def logical_axes(self, path, leaf, base_axes):
    """A follows the kernel's input axis, B its output axis; the rank axis is never split."""
    kernel = api.module_axes(path, base_axes)
    name = path.rsplit("/", 1)[-1]
    if name not in LORA_LEAVES or kernel is None:
      return None
    lead, d_in, d_out = kernel[:-2], kernel[-2], kernel[-1]
    return {"lora_a": (*lead, d_in, "rank"), "lora_b": (*lead, "rank", d_out), "lora_scale": lead,
            "lora_magnitude": (*lead, d_out)}[name]

  def init(self, rng, params):
    modules = api.select_modules(self.targets, api.linear_modules(params), self.name)
    additions, replaced = {}, {}
    for i, module in enumerate(modules):
      kernel = api.get(params, module + "/kernel")
      lead, (d_in, d_out) = api.stacked_shape(kernel), kernel.shape[-2:]
      if self.rank > min(d_in, d_out):
        raise api.MethodError(f"{self.name}: rank {self.rank} > min{(d_in, d_out)} of {module}")
      key = jax.random.fold_in(rng, i)
      b = jnp.zeros((*lead, self.rank, d_out), jnp.float32)
      if self.init_a == "kaiming":  # kaiming_uniform(a=sqrt(5)) on (r, in) = U(+-1/sqrt(in))
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, (*lead, d_in, self.rank), jnp.float32, -bound, bound)
      elif self.init_a == "gaussian":
        a = jax.random.normal(key, (*lead, d_in, self.rank), jnp.float32) / self.rank
      else:
        a, b, residual = self._pissa(kernel)
        replaced[module + "/kernel"] = residual
      additions[module + "/lora_a"] = a
      additions[module + "/lora_b"] = b
      additions[module + "/lora_scale"] = jnp.full(lead, self.scale, jnp.float32)
      if self.dora:
        w = quant.as_dense(replaced.get(module + "/kernel", kernel)) + self.scale * a @ b
        additions[module + "/lora_magnitude"] = jnp.linalg.norm(w, axis=-2)
    params = rules.unflatten({**rules.flatten(params), **replaced})
    return api.with_leaves(params, additions, self.name)

  def _pissa(self, kernel):
    """Principal singular vectors as (a, b); the residual goes back into the base.

    kernel = U S Vh; a = U_r sqrt(S_r / scale), b = sqrt(S_r / scale) Vh_r,
    residual = kernel - scale * a @ b (so the model's output is unchanged).
    """
    if quant.is_quantized(kernel):
      raise api.MethodError("PiSSA needs a dense base to write its residual into; quantize after init")
    u, s, vh = jnp.linalg.svd(api.f32(kernel), full_matrices=False)
    root = jnp.sqrt(s[..., : self.rank] / self.scale)
    a = u[..., :, : self.rank] * root[..., None, :]
    b = root[..., :, None] * vh[..., : self.rank, :]
    residual = (api.f32(kernel) - self.scale * a @ b).astype(kernel.dtype)
    return a, b, residual

  def merge(self, params, requantize: bool = False):
    """-> (dense params without LoRA leaves, adapter leaves incl. DoRA's column norms).

    A quantized base kernel becomes a dense float32 kernel (the merged weight is
    no longer on the 4-bit grid); with `requantize=True` it is quantized again
    in its format, which rounds the LoRA update onto that grid: close to, not
    equal to, the unmerged model.
    """
    flat = rules.flatten(params)
    adapter = {}
    for path in [p for p in flat if p.endswith("/lora_a")]:
      module = path[: -len("/lora_a")]
      kernel = flat[module + "/kernel"]
      a, b = flat.pop(module + "/lora_a"), flat.pop(module + "/lora_b")
      scale = flat.pop(module + "/lora_scale")[..., None, None]
      v = quant.as_dense(kernel) + scale * a @ b
      adapter.update({module + "/lora_a": a, module + "/lora_b": b, module + "/lora_scale": scale[..., 0, 0]})
      if module + "/lora_magnitude" in flat:
        m = flat.pop(module + "/lora_magnitude")
        norm = jnp.linalg.norm(v, axis=-2)
        adapter.update({module + "/lora_magnitude": m, module + "/lora_norm": norm})
        v = v * (m / norm)[..., None, :]
      if quant.is_quantized(kernel):
        adapter[module + "/base_kernel"] = kernel  # unmerge restores the quantized base exactly
        v = quant.quantize_array(v, kernel.fmt, kernel.blocksize, kernel.double_quant) if requantize else v
      else:
        v = v.astype(kernel.dtype)
      flat[module + "/kernel"] = v
    return rules.unflatten(flat), rules.unflatten(adapter)

  def unmerge(self, merged, adapter):
    flat, add = rules.flatten(merged), rules.flatten(adapter)
    for path in [p for p in add if p.endswith("/lora_a")]:
      module = path[: -len("/lora_a")]
      for leaf in LORA_LEAVES:
        if f"{module}/{leaf}" in add:
          flat[f"{module}/{leaf}"] = add[f"{module}/{leaf}"]
      if module + "/base_kernel" in add:
        flat[module + "/kernel"] = add[module + "/base_kernel"]
        continue
      kernel = flat[module + "/kernel"]
      a, b, scale = add[module + "/lora_a"], add[module + "/lora_b"], add[module + "/lora_scale"]
      v = api.f32(kernel)
      if module + "/lora_magnitude" in add:
        v = v * (add[module + "/lora_norm"] / add[module + "/lora_magnitude"])[..., None, :]
      flat[module + "/kernel"] = (v - scale[..., None, None] * a @ b).astype(kernel.dtype)
    return rules.unflatten(flat)


@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
  """LoRA with a trainable magnitude vector (weight-decomposed LoRA)."""
  name: ClassVar[str] = "dora"
  dora: bool = True
