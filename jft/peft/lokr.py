"""LoKr: the update is a Kronecker product of a small factor and a (low-rank) larger one.

Each side of the kernel is split into two factors, in = c * d and out = a * b
(`factorization`: the pair nearest the square root, or `decompose_factor`), and

    dW [in, out] = kron(W1 [c, a], W2 [d, b]) * alpha / r

with W2 = w2_in @ w2_out of rank r unless r >= max(d, b) / 2 (then W2 is a
full `w2`), and W1 full unless `decompose_both` (as LyCORIS and peft decide).
Leaves, leading `[L]` under `layers/`:

    q_proj/lokr/w1 [c, a]  or  w1_in [c, r], w1_out [r, a]     (w1 / w1_out start at zero)
    q_proj/lokr/w2 [d, b]  or  w2_in [d, r], w2_out [r, b]
    q_proj/lokr/scale []                                       frozen constant alpha/r

Factors are in jft's [in, out] orientation, the transposes of peft's
`lokr_w1 [a, c]`, `lokr_w1_a [a, r]`, `lokr_w1_b [r, c]`, ... The Linear hook adds `x @ dW`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jft.core.fields import Flag, Int
from jft.peft import api

Leaf = api.Leaf
FACTORS = ("w1", "w1_in", "w1_out", "w2", "w2_in", "w2_out")


def factorization(n: int, factor: int = -1) -> tuple[int, int]:
  """n = m * k as peft/LyCORIS split it: (factor, n / factor) when `factor` divides n; else
  the divisor pair nearest sqrt(n), smaller part first, whose smaller part stays <= `factor` (-1: any)."""
  if factor > 0 and n % factor == 0:
    return factor, n // factor
  limit = n if factor == -1 else factor
  m, k = 1, n
  while m < k:
    nxt = next(d for d in range(m + 1, n + 1) if n % d == 0)
    if nxt > limit:
      break
    m, k = nxt, n // nxt
  return min(m, k), max(m, k)


@dataclasses.dataclass(frozen=True)
class LoKr(api.WeightDelta):
  name: ClassVar[str] = "lokr"
  group: ClassVar[str] = "lokr"
  leaves: ClassVar[dict] = {**{f: Leaf(axes=None) for f in FACTORS},  # small factors: replicated
                            "scale": Leaf(trainable=False, constant=True, axes=None)}
  recipe: ClassVar[dict] = {"lr": 5e-4}
  peft_type: ClassVar[str] = "LOKR"
  peft_tensors: ClassVar[dict] = {"w1": (".lokr_w1", "T"), "w1_in": (".lokr_w1_b", "T"),
                                  "w1_out": (".lokr_w1_a", "T"), "w2": (".lokr_w2", "T"),
                                  "w2_in": (".lokr_w2_b", "T"), "w2_out": (".lokr_w2_a", "T")}
  targets: tuple = ("q_proj", "v_proj")
  rank: int = 8
  alpha: float = 8.0
  decompose_both: bool = False
  decompose_factor: int = -1
  hparam_rules: ClassVar[dict] = {"decompose_both": Flag(),
                                  "decompose_factor": Int(1, also=(-1,), note="-1 = the most balanced factors")}

  def __post_init__(self):
    if self.rank < 1:
      raise api.MethodError(f"{self.name}: rank must be >= 1, got {self.rank}")
    object.__setattr__(self, "targets", tuple(self.targets))

  def delta(self, p):
    """dW [..., in, out] = kron(W1, W2) * scale, in float32."""
    w1, w2 = _factor(p, "w1"), _factor(p, "w2")
    (c, a), (d, b) = w1.shape[-2:], w2.shape[-2:]
    kron = jnp.einsum("...ij,...kl->...ikjl", w1, w2).reshape(*w1.shape[:-2], c * d, a * b)
    return kron * api.f32(p["scale"])[..., None, None]

  def init(self, rng, params):
    additions = {}
    for i, (module, kernel, lead, d_in, d_out) in enumerate(api.target_kernels(self, params)):
      (a, b), (c, d) = factorization(d_out, self.decompose_factor), factorization(d_in, self.decompose_factor)
      keys = iter(jax.random.split(jax.random.fold_in(rng, i), 4))
      # peft: kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(fan_in)) of the torch tensor; W1's out side starts at zero
      uniform = lambda shape, fan_in: jax.random.uniform(next(keys), (*lead, *shape), jnp.float32, -1, 1) \
          / math.sqrt(fan_in)
      zeros = lambda shape: jnp.zeros((*lead, *shape), jnp.float32)
      group = {"scale": jnp.full(lead, self.alpha / self.rank, jnp.float32)}
      if self.decompose_both and self.rank < max(a, c) / 2:
        group.update(w1_in=uniform((c, self.rank), c), w1_out=zeros((self.rank, a)))
      else:
        group.update(w1=zeros((c, a)))
      if self.rank < max(b, d) / 2:
        group.update(w2_in=uniform((d, self.rank), d), w2_out=uniform((self.rank, b), self.rank))
      else:
        group.update(w2=uniform((d, b), d))
      additions.update({f"{module}/lokr/{k}": v for k, v in group.items()})
    return api.with_leaves(params, additions, self.name)

  def peft_config(self, params):
    return {"r": self.rank, "alpha": self.alpha, "target_modules": api.module_names(self.modules(params)),
            "decompose_both": self.decompose_both, "decompose_factor": self.decompose_factor,
            "rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False, "init_weights": True,
            "use_effective_conv2d": False, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}

  @classmethod
  def from_peft_config(cls, cfg):
    for field in ("layers_to_transform", "rank_pattern", "alpha_pattern", "rank_dropout", "module_dropout"):
      if cfg.get(field):
        raise api.MethodError(f"{field}={cfg[field]!r} is not supported")
    return cls(targets=api.peft_targets(cfg), rank=cfg["r"], alpha=cfg["alpha"],
               decompose_both=cfg.get("decompose_both", False), decompose_factor=cfg.get("decompose_factor", -1))


def _factor(p, name):
  return api.f32(p[name]) if name in p else api.f32(p[name + "_in"]) @ api.f32(p[name + "_out"])
