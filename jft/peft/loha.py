"""LoHa: the update is the Hadamard (elementwise) product of two low-rank factorizations.

Before and after `init` (r = rank, leading `[L]` under `layers/`):

    q_proj/kernel [in, out]  ->  + q_proj/loha/w1_in [in, r]    w1_out [r, out]
                                 + q_proj/loha/w2_in [in, r]    (zeros)  w2_out [r, out]
                                 + q_proj/loha/scale []         frozen constant alpha/r

    dW = (w1_in @ w1_out) * (w2_in @ w2_out) * scale

so two rank-r factors reach rank up to r^2 for the parameters of LoRA with
rank 2r (Hyeon-Woo et al. 2022, as in LyCORIS and peft). The factors are
kept in jft's [in, out] orientation: peft's `hada_w1_a [out, r]` is
`w1_out` transposed and `hada_w1_b [r, in]` is `w1_in` transposed. The
Linear hook adds `x @ dW`, as peft does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft.peft import api

Leaf = api.Leaf


@dataclasses.dataclass(frozen=True)
class LoHa(api.WeightDelta):
  name: ClassVar[str] = "loha"
  group: ClassVar[str] = "loha"
  leaves: ClassVar[dict] = {
      "w1_in": Leaf(axes=("in", "rank")), "w1_out": Leaf(axes=("rank", "out")),
      "w2_in": Leaf(axes=("in", "rank")), "w2_out": Leaf(axes=("rank", "out")),
      "scale": Leaf(trainable=False, constant=True, axes=()),
  }
  # sentiment demo budget, validation accuracy: 0.837 at lr 5e-4 (LoRA's), 0.903 at 2e-3
  recipe: ClassVar[dict] = {"lr": 2e-3}
  peft_type: ClassVar[str] = "LOHA"
  peft_tensors: ClassVar[dict] = {"w1_out": (".hada_w1_a", "T"), "w1_in": (".hada_w1_b", "T"),
                                  "w2_out": (".hada_w2_a", "T"), "w2_in": (".hada_w2_b", "T")}
  targets: tuple = ("q_proj", "v_proj")
  rank: int = 8
  alpha: float = 8.0

  def __post_init__(self):
    if self.rank < 1:
      raise api.MethodError(f"{self.name}: rank must be >= 1, got {self.rank}")
    object.__setattr__(self, "targets", tuple(self.targets))

  def delta(self, p):
    """dW [..., in, out] in float32."""
    w1 = api.f32(p["w1_in"]) @ api.f32(p["w1_out"])
    w2 = api.f32(p["w2_in"]) @ api.f32(p["w2_out"])
    return w1 * w2 * api.f32(p["scale"])[..., None, None]

  def init(self, rng, params):
    additions = {}
    for i, (module, kernel, lead, d_in, d_out) in enumerate(api.target_kernels(self, params)):
      k1, k2, k3 = jax.random.split(jax.random.fold_in(rng, i), 3)
      # peft: kaiming_uniform(a=sqrt 5), i.e. U(+-1/sqrt(fan_in)) of the torch tensor, on w1_a, w1_b, w2_a;
      # w2_b zeros, so the model starts as the base.
      uniform = lambda key, shape, fan_in: jax.random.uniform(key, shape, jnp.float32, -1, 1) / math.sqrt(fan_in)
      additions.update({
          f"{module}/loha/w1_in": uniform(k1, (*lead, d_in, self.rank), d_in),
          f"{module}/loha/w1_out": uniform(k2, (*lead, self.rank, d_out), self.rank),
          f"{module}/loha/w2_in": jnp.zeros((*lead, d_in, self.rank), jnp.float32),
          f"{module}/loha/w2_out": uniform(k3, (*lead, self.rank, d_out), self.rank),
          f"{module}/loha/scale": jnp.full(lead, self.alpha / self.rank, jnp.float32),
      })
    return api.with_leaves(params, additions, self.name)

  def peft_config(self, params):
    return {"r": self.rank, "alpha": self.alpha, "target_modules": api.module_names(self.modules(params)),
            "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, "use_effective_conv2d": False,
            "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}

  @classmethod
  def from_peft_config(cls, cfg):
    for field in ("layers_to_transform", "rank_pattern", "alpha_pattern", "rank_dropout", "module_dropout"):
      if cfg.get(field):
        raise api.MethodError(f"{field}={cfg[field]!r} is not supported")
    return cls(targets=api.peft_targets(cfg), rank=cfg["r"], alpha=cfg["alpha"])
