"""LoRA and its variants: rsLoRA, PiSSA initialisation, DoRA.

Param tree of one targeted linear, before and after `init` (leading `[L]`
on everything under `layers/`, the scanned layer axis):

    q_proj/                          q_proj/
      kernel [in, out]        ->       kernel [in, out]        frozen (PiSSA: residual)
                                       lora/a [in, r]          trainable, f32
                                       lora/b [r, out]         trainable, f32, zeros
                                       lora/scale []           frozen constant alpha/r
                                       lora/magnitude [out]    trainable (DoRA only)

At the Linear hook: `y += scale * dropout(x) @ a @ b`; DoRA rescales each
output column of `kernel + scale * a @ b` to `magnitude`, with the column
norm treated as a constant in the backward pass (as the paper and peft do).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft import quant
from jft.core import rules
from jft.models.layers import dropout
from jft.core.fields import Choice, Flag
from jft.peft import api

Leaf = api.Leaf


def dora_column(kernel, a, b, scale, magnitude):
  """DoRA's per-output-column factor `magnitude / ||kernel + scale * a @ b||` (norm over the input axis,
  no gradient through it). Leading axes (stacked layers, stacked adapters) broadcast: training calls
  it per layer, `jft serve` once per adapter."""
  v = quant.as_dense(kernel).astype(jnp.float32) + jnp.asarray(scale, jnp.float32)[..., None, None] * jnp.matmul(
      api.f32(a), api.f32(b))
  return api.f32(magnitude) / jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=-2)))


@dataclasses.dataclass(frozen=True)
class LoRA(api.Method):
  name: ClassVar[str] = "lora"
  group: ClassVar[str] = "lora"
  leaves: ClassVar[dict] = {
      "a": Leaf(axes=("in", "rank")), "b": Leaf(axes=("rank", "out")),
      "scale": Leaf(trainable=False, constant=True, axes=()),
      "magnitude": Leaf(decay=False, axes=("out",)),
  }
  legacy: ClassVar[tuple] = ((r"/lora_(a|b|scale|magnitude)$", r"/lora/\1"),)
  recipe: ClassVar[dict] = {"lr": 5e-4}
  peft_type: ClassVar[str] = "LORA"
  peft_tensors: ClassVar[dict] = {"a": (".lora_A.weight", "T"), "b": (".lora_B.weight", "T"),
                                  "magnitude": (".lora_magnitude_vector", "")}
  targets: tuple = ("q_proj", "v_proj")
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
  init_a: str = "kaiming"  # "kaiming" (peft's default) | "gaussian" (std 1/r) | "pissa"
  dora: bool = False
  hparam_rules: ClassVar[dict] = {"rslora": Flag(), "init_a": Choice(("kaiming", "gaussian", "pissa")), "dora": Flag()}

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

  def linear_output(self, p, x, y, kernel, module):
    dt = module.dtype
    delta = jnp.dot(jnp.dot(dropout(module, x, self.dropout), p["a"].astype(dt)), p["b"].astype(dt))
    delta = delta * p["scale"].astype(dt)
    if "magnitude" not in p:
      return y + delta
    return dora_column(kernel, p["a"], p["b"], p["scale"], p["magnitude"]).astype(dt) * (y + delta)

  def init(self, rng, params):
    additions, replaced = {}, {}
    for i, (module, kernel, lead, d_in, d_out) in enumerate(api.target_kernels(self, params)):
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
      group = {"a": a, "b": b, "scale": jnp.full(lead, self.scale, jnp.float32)}
      if self.dora:
        w = quant.as_dense(replaced.get(module + "/kernel", kernel)) + self.scale * a @ b
        group["magnitude"] = jnp.linalg.norm(w, axis=-2)
      additions.update({f"{module}/lora/{k}": v for k, v in group.items()})
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

  def fold(self, p, kernel, bias):
    v = kernel + p["scale"][..., None, None] * p["a"] @ p["b"]
    if "magnitude" not in p:
      return v, bias, {}
    norm = jnp.linalg.norm(v, axis=-2)  # DoRA: the column norms the unmerge divides out again
    return v * (p["magnitude"] / norm)[..., None, :], bias, {"norm": norm}

  def unfold(self, p, extra, kernel, bias):
    if "magnitude" in p:
      kernel = kernel * (extra["norm"] / p["magnitude"])[..., None, :]
    return kernel - p["scale"][..., None, None] * p["a"] @ p["b"], bias

  def peft_config(self, params):
    return {"r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "use_rslora": self.rslora,
            "use_dora": self.dora, "target_modules": api.module_names(self.modules(params)),
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}}

  @staticmethod
  def stack(trees, names):
    """LoRA trees -> one tree with a leading adapter axis, zero-padded to a common rank.

    A module one tree does not target gets zeros there (a no-op for it); for
    mixed-batch inference (`jft.peft.multi`), where each example picks one.
    """
    flats = [rules.flatten(t) for t in trees]
    modules = sorted({p[: -len("/lora/a")] for f in flats for p in f if p.endswith("/lora/a")})
    for f, n in zip(flats, names):
      if any(p.endswith("/lora/magnitude") for p in f):
        raise api.MethodError(f"mixed-batch inference supports plain LoRA; {n!r} is DoRA (merge it instead)")
    rank = max(f[m + "/lora/a"].shape[-1] for f in flats for m in modules if m + "/lora/a" in f)
    stacked = {}
    for m in modules:
      ref = next(f for f in flats if m + "/lora/a" in f)
      parts = {"a": [], "b": [], "scale": []}
      for f in flats:
        if m + "/lora/a" in f:
          a, b, s = f[m + "/lora/a"], f[m + "/lora/b"], f[m + "/lora/scale"]
        else:
          a, b, s = (jnp.zeros_like(ref[f"{m}/lora/{k}"]) for k in ("a", "b", "scale"))
        pad = rank - a.shape[-1]
        parts["a"].append(jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]))
        parts["b"].append(jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)]))
        parts["scale"].append(s)
      stacked.update({f"{m}/lora/{k}": jnp.stack(v) for k, v in parts.items()})
    return rules.unflatten(stacked)

  @classmethod
  def from_peft_config(cls, cfg):
    for field in ("layers_to_transform", "rank_pattern", "alpha_pattern"):
      if cfg.get(field):
        raise api.MethodError(f"{field}={cfg[field]!r} is not supported")
    kind = DoRA if cfg.get("use_dora") else LoRA
    return kind(targets=api.peft_targets(cfg), rank=cfg["r"], alpha=cfg["lora_alpha"],
                dropout=cfg.get("lora_dropout", 0.0), rslora=cfg.get("use_rslora", False))


@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
  """LoRA with a trainable magnitude vector (weight-decomposed LoRA)."""
  name: ClassVar[str] = "dora"
  dora: bool = True
