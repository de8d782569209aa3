"""VeRA: one frozen random pair A, B shared by every adapted linear; per module only two vectors train.

Before and after `init` (r = rank, leading `[L]` under `layers/`):

    vera/A [max_in, r], vera/B [r, max_out]     frozen, shared (random; kaiming uniform as peft)
    q_proj/kernel [in, out]   ->  + q_proj/vera/lambda_d [r]      trainable, d_initial
                                  + q_proj/vera/lambda_b [out]    trainable, zeros (starts at the base)

The update of a module is `dW = (A[:in] * lambda_d) @ (B[:, :out] * lambda_b)`
(Kopiczko et al. 2024; peft's layout: one pair sized by the largest
targeted in/out features, sliced per module). `materialize` hands each module
its slices inside the loss, so the checkpoint stores the pair once; the
Linear hook adds `lambda_b * ((dropout(x) @ A * lambda_d) @ B)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft.core import rules
from jft.models.layers import dropout
from jft.core.fields import Float
from jft.peft import api

Leaf = api.Leaf


@dataclasses.dataclass(frozen=True)
class VeRA(api.WeightDelta):
  name: ClassVar[str] = "vera"
  group: ClassVar[str] = "vera"
  leaves: ClassVar[dict] = {
      "lambda_d": Leaf(decay=False, axes=("rank",)), "lambda_b": Leaf(decay=False, axes=("out",)),
      # the shared pair (top level), and its per-module slices made by `materialize`
      "A": Leaf(trainable=False, constant=True, axes=None), "B": Leaf(trainable=False, constant=True, axes=None),
  }
  recipe: ClassVar[dict] = {"lr": 5e-3}
  peft_type: ClassVar[str] = "VERA"
  peft_tensors: ClassVar[dict] = {"lambda_d": (".vera_lambda_d", ""), "lambda_b": (".vera_lambda_b", "")}
  targets: tuple = ("q_proj", "v_proj")
  rank: int = 256
  d_initial: float = 0.1
  hparam_rules: ClassVar[dict] = {"d_initial": Float(0, lo_open=True)}
  dropout: float = 0.0

  def __post_init__(self):
    if self.rank < 1:
      raise api.MethodError(f"{self.name}: rank must be >= 1, got {self.rank}")
    if not 0 <= self.dropout < 1:
      raise api.MethodError(f"{self.name}: dropout must be in [0, 1), got {self.dropout}")
    object.__setattr__(self, "targets", tuple(self.targets))

  def linear_output(self, p, x, y, kernel, module):  # low rank: x @ A, never dW
    dt = module.dtype
    h = jnp.dot(dropout(module, x, self.dropout), p["A"].astype(dt)) * p["lambda_d"].astype(dt)
    return y + jnp.dot(h, p["B"].astype(dt)) * p["lambda_b"].astype(dt)

  def delta(self, p):  # for merging; the forward pass above never forms dW
    return (p["A"] * p["lambda_d"][..., None, :]) @ (p["B"] * p["lambda_b"][..., None, :])

  def init(self, rng, params):
    kernels = {module: kernel for module, kernel, *_ in api.target_kernels(self, params)}
    max_in = max(k.shape[-2] for k in kernels.values())
    max_out = max(k.shape[-1] for k in kernels.values())
    ka, kb = jax.random.split(rng)
    # kaiming uniform (gain sqrt 2) on peft's (r, max_in) and (max_out, r): bound sqrt(6 / fan_in)
    additions = {"vera/A": jax.random.uniform(ka, (max_in, self.rank), jnp.float32, -1, 1) * math.sqrt(6 / max_in),
                 "vera/B": jax.random.uniform(kb, (self.rank, max_out), jnp.float32, -1, 1) * math.sqrt(6 / self.rank)}
    for module, kernel in kernels.items():
      lead = api.stacked_shape(kernel)
      additions[module + "/vera/lambda_d"] = jnp.full((*lead, self.rank), self.d_initial, jnp.float32)
      additions[module + "/vera/lambda_b"] = jnp.zeros((*lead, kernel.shape[-1]), jnp.float32)
    return api.with_leaves(params, additions, self.name)

  def materialize(self, params):
    if "vera" not in params:
      return params
    shared = params["vera"]
    flat = {p: v for p, v in rules.flatten(params).items() if not p.startswith("vera/")}
    for path in [p for p in flat if p.endswith("/vera/lambda_b")]:
      module = path[: -len("/vera/lambda_b")]
      kernel, lead = flat[module + "/kernel"], flat[path].shape[:-1]
      d_in, d_out = kernel.shape[-2:]
      flat[module + "/vera/A"] = jnp.broadcast_to(shared["A"][:d_in], (*lead, d_in, self.rank))
      flat[module + "/vera/B"] = jnp.broadcast_to(shared["B"][:, :d_out], (*lead, self.rank, d_out))
    return rules.unflatten(flat)

  def shared(self, params):
    """The shared pair {"A", "B"} of the method's tree (as `init` made it; `materialize` leaves only slices)."""
    if "vera" not in params:
      raise ValueError("vera: no shared pair (vera/A, vera/B) at the top of the tree: merging and exporting take "
                       "the method's tree as `init` made it, not `materialize`'s (a restored run: `tree()`, "
                       "not `params()`)")
    return params["vera"]

  def merge(self, params, requantize: bool = False):
    shared = self.shared(params)
    merged, detached = super().merge(params, requantize)
    return merged, {"modules": detached, "shared": shared}

  def unmerge(self, merged, detached):
    restored = super().unmerge(merged, detached["modules"])
    flat = {p: v for p, v in rules.flatten(restored).items() if not p.endswith(("/vera/A", "/vera/B"))}
    return api.with_leaves(rules.unflatten(flat), {"vera/A": detached["shared"]["A"],
                                                   "vera/B": detached["shared"]["B"]}, self.name)

  def peft_config(self, params):
    return {"r": self.rank, "target_modules": api.module_names([m for m in self.modules(params) if m]), "projection_prng_key": 0,
            "save_projection": True, "vera_dropout": self.dropout, "d_initial": self.d_initial,
            "fan_in_fan_out": False, "bias": "none", "init_weights": True, "layers_to_transform": None}

  @classmethod
  def from_peft_config(cls, cfg):
    if not cfg.get("save_projection", True):
      raise api.MethodError("save_projection=False: the shared A/B are not in the folder (peft regenerates "
                            "them with torch's generator, which jft does not reproduce)")
    if cfg.get("layers_to_transform"):
      raise api.MethodError(f"layers_to_transform={cfg['layers_to_transform']!r} is not supported")
    return cls(targets=api.peft_targets(cfg), rank=cfg["r"], d_initial=cfg.get("d_initial", 0.1),
               dropout=cfg.get("vera_dropout", 0.0))

  def peft_export(self, params, io):
    super().peft_export(params, io)  # the per-module vectors
    shared = self.shared(params)
    io.put_global("base_model.vera_A", shared["A"].T)  # peft: (r, max_in), (max_out, r)
    io.put_global("base_model.vera_B", shared["B"].T)

  def peft_import(self, params, io):
    return {**super().peft_import(params, io), "vera/A": io.take_global("base_model.vera_A").T,
            "vera/B": io.take_global("base_model.vera_B").T}
