"""LoRA adapters combined into one, as peft 0.22's `LoraModel.add_weighted_adapter` does (pure array maths).

Each adapter is `{module: (a [..., in, r], b [..., r, out], scale [...])}` in jft's layout (leading axes:
the stacked layers); the result is `{module: (a, b)}` whose scale is 1 (peft sets `lora_alpha = r` and
turns rsLoRA off), so `a @ b` is the merged delta. Every reduction peft makes over one module's tensor
(top-k, sign election) is made here per trailing matrix, i.e. per layer.

peft's semantics, some of them surprising, followed exactly:

- `linear`, `ties`, `dare_*`, `magnitude_prune` combine the A's and the B's *separately*, each with
  weight `sqrt(|w * scale|)` (the sign of `w * scale` on A only). The merged delta is therefore
  `(sum_i sqrt(w_i s_i) B_i) (sum_j sqrt(w_j s_j) A_j)`: it has cross terms `B_i A_j` and is not
  `sum_i w_i s_i B_i A_i` unless there is one adapter. These types need equal ranks.
- `ties` and `dare_ties` prune, elect the sign and average the A (and B) factors, not the deltas;
  the sign is elected on the pruned, unweighted factors (`sum >= 0` -> +); entries of the losing sign
  or pruned to 0 drop out of the average.
- `cat` stacks `w_i s_i A_i` and `B_i` along the rank: exactly `sum_i w_i s_i B_i A_i`, rank = sum of ranks.
- `svd` takes the truncated SVD of `sum_i w_i s_i B_i A_i` (rank: `svd_rank`, default the largest input
  rank); the singular values go into B.
- One adapter is always merged as `linear`, whatever type was asked (and `svd_rank` is then unused).
- `density >= 1` prunes nothing (and DARE then does not rescale); DARE keeps each entry with
  probability `density` and divides the kept ones by it.
"""

from __future__ import annotations

import math

import numpy as np

from jft.core.errors import JftError

COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_TYPES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
EQUAL_RANK_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


class MergeError(JftError, ValueError):
  """Adapters that cannot be merged, or merge settings that are not allowed."""


def check_settings(combination: str, weights, count: int, density=None, svd_rank=None):
  """The settings alone (before any adapter is read): one named error for the first thing wrong."""
  if combination not in COMBINATIONS:
    raise MergeError(f"merge method {combination!r} is unknown; choose one of {', '.join(COMBINATIONS)}")
  if count < 1:
    raise MergeError("merge needs at least one adapter")
  if len(weights) != count:
    raise MergeError(f"{len(weights)} weight(s) for {count} adapter(s); give one weight per adapter")
  if not all(math.isfinite(w) for w in weights):
    raise MergeError(f"weights {list(weights)}: every weight must be a finite number")
  if combination in DENSITY_TYPES:
    if density is None:
      raise MergeError(f"merge method {combination} needs a density (the fraction of entries kept, in (0, 1])")
    if not 0 < density <= 1:
      raise MergeError(f"density {density}: must be in (0, 1] (the fraction of entries kept)")
  elif density is not None:
    raise MergeError(f"density applies to {', '.join(DENSITY_TYPES)}, not to {combination}")
  if svd_rank is not None:
    if combination != "svd":
      raise MergeError(f"svd_rank applies to the svd method, not to {combination}")
    if svd_rank < 1:
      raise MergeError(f"svd_rank {svd_rank}: must be >= 1")


def effective(combination: str, count: int) -> str:
  """The type peft really uses: one adapter is always merged linearly."""
  return "linear" if count == 1 else combination


def merged_rank(combination: str, ranks, svd_rank=None) -> int:
  """The rank of the merged adapter (peft's rule for `combination`, after `effective`)."""
  ranks = [int(r) for r in ranks]
  if combination in EQUAL_RANK_TYPES:
    if len(set(ranks)) != 1:
      raise MergeError(f"merge method {combination} needs adapters of one rank, these have ranks {ranks} "
                       "(cat and svd take different ranks)")
    return ranks[0]
  if combination == "cat":
    return sum(ranks)
  return svd_rank or max(ranks)


def _split_weights(weights, scales):
  """peft's per-factor weights: sqrt(|w * s|) with the sign on A's weight only; shapes [...] like `scales`."""
  ws = [w * np.asarray(s, np.float64) for w, s in zip(weights, scales)]
  root = [np.sqrt(np.abs(x)) for x in ws]
  return [np.where(x >= 0, r, -r) for x, r in zip(ws, root)], root


def magnitude_mask(x: np.ndarray, density: float) -> np.ndarray:
  """Keep the `int(density * n)` largest |entries| of each trailing matrix (peft's magnitude pruning)."""
  flat = np.abs(x).reshape(*x.shape[:-2], -1)
  k = int(density * flat.shape[-1])
  mask = np.zeros(flat.shape, bool)
  if k > 0:
    top = np.argpartition(-flat, k - 1, axis=-1)[..., :k]
    np.put_along_axis(mask, top, True, axis=-1)
  return mask.reshape(x.shape)


def _prune(x, density, kind, rng):
  if density >= 1:
    return x
  if kind == "magnitude":
    return x * magnitude_mask(x, density)
  return x * (rng.random(x.shape) < density) / density  # DARE: Bernoulli(density) keeps, rescaled


def _combine(kind: str, tensors, weights, density, rngs):
  """One factor (all A's or all B's) of a module by `kind`; `weights[i]` has the leading shape."""
  if kind in ("ties", "magnitude_prune"):
    tensors = [_prune(t, density, "magnitude", None) for t in tensors]
  elif kind in ("dare_linear", "dare_ties"):
    tensors = [_prune(t, density, "random", rng) for t, rng in zip(tensors, rngs)]
  stacked = np.stack(tensors)
  weighted = stacked * np.stack(weights)[..., None, None]
  if kind in ("ties", "dare_ties"):
    majority = np.where(stacked.sum(axis=0) >= 0, 1.0, -1.0)
    keep = np.sign(stacked) == majority
    return (weighted * keep).sum(axis=0) / np.maximum(keep.sum(axis=0), 1)
  return weighted.sum(axis=0)


def merge_module(combination: str, parts, weights, rank: int, density=None, rngs=None):
  """`parts` [(a, b, scale)] of one module -> merged (a, b) at scale 1, in float32.

  `rngs`: one numpy Generator per (factor, adapter), `rngs[factor][i]`, for the DARE types."""
  a_s = [np.asarray(p[0], np.float64) for p in parts]
  b_s = [np.asarray(p[1], np.float64) for p in parts]
  scales = [np.asarray(p[2], np.float64) for p in parts]
  if combination == "cat":
    a = np.concatenate([w * s[..., None, None] * x for w, s, x in zip(weights, scales, a_s)], axis=-1)
    return a.astype(np.float32), np.concatenate(b_s, axis=-2).astype(np.float32)
  if combination == "svd":
    delta = sum(w * s[..., None, None] * (x @ y) for w, s, x, y in zip(weights, scales, a_s, b_s))
    if rank > min(delta.shape[-2:]):
      raise MergeError(f"svd rank {rank} > min{tuple(delta.shape[-2:])}, the size of the module's weight")
    # jft's delta is peft's transposed: its left vectors are peft's A (rows), the singular values go to B
    u, sv, vh = np.linalg.svd(delta.astype(np.float32), full_matrices=False)
    return (np.ascontiguousarray(u[..., :, :rank]).astype(np.float32),
            (sv[..., :rank, None] * vh[..., :rank, :]).astype(np.float32))
  w_a, w_b = _split_weights(weights, scales)
  rngs = rngs or ([None] * len(parts), [None] * len(parts))
  a = _combine(combination, a_s, w_a, density, rngs[0])
  b = _combine(combination, b_s, w_b, density, rngs[1])
  return a.astype(np.float32), b.astype(np.float32)


def merge_adapters(combination: str, adapters, weights, density=None, svd_rank=None, seed: int = 0):
  """`adapters` [{module: (a, b, scale)}] (the same modules) -> (type used, rank, {module: (a, b)}) at scale 1.

  DARE's draws are seeded by (seed, module index in sorted order, factor, adapter index)."""
  check_settings(combination, list(weights), len(adapters), density, svd_rank)
  combination = effective(combination, len(adapters))
  modules = sorted(adapters[0])
  for i, adapter in enumerate(adapters[1:], 1):
    if sorted(adapter) != modules:
      raise MergeError(f"adapter {i} targets other modules than adapter 0: "
                       f"{sorted(set(adapter) ^ set(modules))[:4]} are in one only")
  ranks = {int(np.shape(adapter[m][0])[-1]) for adapter in adapters for m in modules}
  if combination in EQUAL_RANK_TYPES and len(ranks) > 1:
    raise MergeError(f"merge method {combination} needs adapters of one rank, these have ranks {sorted(ranks)}")
  per_adapter = [max(int(np.shape(adapter[m][0])[-1]) for m in modules) for adapter in adapters]
  rank = merged_rank(combination, per_adapter, svd_rank)
  out = {}
  for index, module in enumerate(modules):
    rngs = None
    if combination.startswith("dare"):
      rngs = tuple([np.random.default_rng([seed, index, factor, i]) for i in range(len(adapters))]
                   for factor in (0, 1))
    out[module] = merge_module(combination, [adapter[module] for adapter in adapters], list(weights), rank,
                               density, rngs)
  return combination, rank, out
