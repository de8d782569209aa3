"""Sparsity patterns and the pure maths of pruning one linear layer: magnitude, Wanda, SparseGPT.

Layer 1 (imports core/ and quant's dense view only), beside quantization: both compress a frozen base.

Weights here are in the papers' `[out, in]` layout: a row is one output unit, and a row is the
comparison group (Wanda's per-output ranking; SparseGPT's mask is chosen per row as well, so every
row reaches the requested sparsity exactly). jft's kernels are `[in, out]`: callers transpose.

    parse_pattern("0.5" | "2:4" | "4:8")   unstructured fraction of zeros, or N kept in every M inputs
    magnitude_scores(w)                     |W|
    wanda_scores(w, sq_norm)                |W| * ||X_j||_2 (Sun et al. 2023), sq_norm[j] = sum_t x_tj^2
    prune_mask(scores, pattern)             True where a weight goes: the lowest scores of each row / group
    sparsegpt(w, hessian, pattern)          Frantar & Alistarh 2023: OBS updates of the kept weights

A pruned model folder records what was pruned in `jft_sparsity.json` (`RECORD`); the masks themselves are
the weights that are exactly zero. `keep_zeros` puts those zeros back into a merged adapter's weights, so
`jft export --format merged` of a run on a pruned base stays as sparse as the base.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jft.core import files, rules
from jft.core.errors import JftError
from jft.quant import as_dense

RECORD = "jft_sparsity.json"
SPARSEGPT_BLOCK = 128  # columns per lazy-update block (the paper's B)


class SparsityError(JftError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Pattern:
  """A sparsity pattern: `fraction` of zeros; with `m`, exactly m - n zeros in every m consecutive inputs of a row
  (NVIDIA's N:M, N kept: 2:4 and 4:8 are 50%)."""
  fraction: float
  n: int = 0
  m: int = 0

  def __str__(self):
    return f"{self.n}:{self.m}" if self.m else f"{self.fraction:g}"

  def pruned_per_row(self, inputs: int) -> int:
    """Weights each row loses (round half up of fraction * inputs; N:M: (m - n) per group)."""
    return inputs // self.m * (self.m - self.n) if self.m else int(np.floor(self.fraction * inputs + 0.5))

  def check(self, inputs: int, where: str):
    if self.m and inputs % self.m:
      raise SparsityError(f"--sparsity {self}: {where} has {inputs} inputs per row, not a multiple of {self.m}")


def parse_pattern(spec) -> Pattern:
  """"0.5" (a fraction in (0, 1)) or "N:M" (integers, 0 < N < M) -> Pattern; anything else is one named error."""
  text = str(spec).strip()
  allowed = "a fraction of zeros in (0, 1) such as 0.5, or N:M with integers 0 < N < M such as 2:4 or 4:8"
  if ":" in text:
    found = re.fullmatch(r"(\d+):(\d+)", text)
    if not found:
      raise SparsityError(f"--sparsity {text!r}: not N:M with integers N and M; expected {allowed}")
    n, m = int(found[1]), int(found[2])
    if not 0 < n < m:
      raise SparsityError(f"--sparsity {text}: N={n} must be at least 1 and less than M={m}; expected {allowed}")
    return Pattern(1.0 - n / m, n, m)
  try:
    fraction = float(text)
  except ValueError:
    raise SparsityError(f"--sparsity {text!r}: not a number; expected {allowed}") from None
  if not 0.0 < fraction < 1.0:
    raise SparsityError(f"--sparsity {text}: outside (0, 1); expected {allowed}")
  return Pattern(fraction)


def magnitude_scores(w) -> np.ndarray:
  return np.abs(np.asarray(w, np.float32))


def wanda_scores(w, sq_norm) -> np.ndarray:
  """|W_ij| * ||X_j||_2: a weight matters as much as the inputs it multiplies (`sq_norm`: sum of x_j^2)."""
  return np.abs(np.asarray(w, np.float32)) * np.sqrt(np.maximum(np.asarray(sq_norm, np.float32), 0))[None, :]


def prune_mask(scores, pattern: Pattern) -> np.ndarray:
  """True where a weight is pruned: the lowest scores of each row (or of each group of m inputs of a row).
  Ties go to the earlier input (a stable sort), so the count is always exact."""
  scores = np.asarray(scores)
  rows, inputs = scores.shape
  if pattern.m:
    groups = scores.reshape(rows, inputs // pattern.m, pattern.m)
    lowest = np.argsort(groups, axis=-1, kind="stable")[..., :pattern.m - pattern.n]
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, lowest, True, axis=-1)
    return mask.reshape(rows, inputs)
  lowest = np.argsort(scores, axis=1, kind="stable")[:, :pattern.pruned_per_row(inputs)]
  mask = np.zeros(scores.shape, bool)
  np.put_along_axis(mask, lowest, True, axis=1)
  return mask


def upper_inverse_factor(hessian, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
  """(U, dead): U upper-triangular with U^T U = (H + lambda I)^-1, lambda = damp * mean(diag H), in float64;
  `dead` marks inputs that were always zero (their diagonal is set to 1, as in the paper's code)."""
  h = np.array(hessian, np.float64)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  mean = float(np.mean(np.diag(h)))
  h[np.diag_indices_from(h)] += damp * mean
  lower = np.linalg.cholesky(h)
  inv_lower = np.linalg.solve(lower, np.eye(len(h)))
  inverse = inv_lower.T @ inv_lower
  return np.linalg.cholesky((inverse + inverse.T) / 2).T, dead


def sparsegpt(w, hessian, pattern: Pattern, blocksize: int = SPARSEGPT_BLOCK, damp: float = 0.01) -> np.ndarray:
  """SparseGPT: prune W [out, in] to `pattern` column by column, each pruned weight's error spread over the
  columns not yet visited through the inverse Hessian (H = 2 X X^T / tokens, damped by `damp` of its mean
  diagonal). The mask is chosen lazily per block of columns from w^2 / [H^-1]_jj^2 (per row, so each row
  loses exactly its share; for N:M at the first column of every group). Returns the pruned W (float32)."""
  weight = np.array(w, np.float32)
  rows, inputs = weight.shape
  pattern.check(inputs, "the weight")
  u, dead = upper_inverse_factor(hessian, damp)
  u = u.astype(np.float32)
  weight[:, dead] = 0.0
  if pattern.m:  # blocks hold whole groups
    blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
  quota = lambda col: int(np.floor(pattern.fraction * col + 0.5))  # weights pruned in columns [0, col)
  for start in range(0, inputs, blocksize):
    end = min(start + blocksize, inputs)
    block, u_block = weight[:, start:end], u[start:end, start:end]
    mask = np.zeros(block.shape, bool)
    count = quota(end) - quota(start)
    if not pattern.m and count:
      lowest = np.argsort(block ** 2 / np.diag(u_block)[None, :] ** 2, axis=1, kind="stable")[:, :count]
      np.put_along_axis(mask, lowest, True, axis=1)
    pruned, errors = _obs_block(jnp.asarray(block), jnp.asarray(u_block), jnp.asarray(mask), pattern.n, pattern.m)
    weight[:, start:end] = np.asarray(pruned)
    weight[:, end:] -= np.asarray(errors) @ u[start:end, end:]
  return weight


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _obs_block(block, u_block, mask, n: int, m: int):
  """One block of SparseGPT's columns, in order: (pruned block, the errors err_i = (w_i - q_i) / U_ii).

  Column i's error updates every column of the block by err_i * U[i, :], which is zero left of i (U is upper
  triangular), so the update can span the block and the loop has one shape. With N:M (m > 0) the mask of
  each group of m columns is chosen when the loop reaches it, from the weights updated so far."""
  rows, width = block.shape
  diag = jnp.diag(u_block)
  group = m or 1

  def body(g, carry):
    block, mask, errors = carry
    first = g * group
    if m:
      cols = jax.lax.dynamic_slice(block, (0, first), (rows, m))
      score = cols ** 2 / jax.lax.dynamic_slice(diag, (first,), (m,))[None, :] ** 2
      ranks = jnp.argsort(jnp.argsort(score, axis=1, stable=True), axis=1, stable=True)
      mask = jax.lax.dynamic_update_slice(mask, ranks < m - n, (0, first))
    for j in range(group):
      i = first + j
      column = block[:, i]
      kept = jnp.where(mask[:, i], 0.0, column)
      err = (column - kept) / u_block[i, i]
      block = (block - err[:, None] * u_block[i][None, :]).at[:, i].set(kept)  # exact zeros where pruned
      errors = errors.at[:, i].set(err)
    return block, mask, errors

  block, _, errors = jax.lax.fori_loop(0, width // group, body, (block, mask, jnp.zeros_like(block)))
  return block, errors


# ----------------------------------------------------------------------------
# The record of a pruned folder, and zeros kept through a merge
# ----------------------------------------------------------------------------

RECORD_FIELDS = {"pattern": (str, type(None)), "modules": list, "num_hidden_layers": int}


def read_record(folder: str) -> dict | None:
  """`folder`'s `jft_sparsity.json` (validated), or None when the folder records no pruning."""
  path = os.path.join(folder, RECORD) if os.path.isdir(folder) else None
  if path is None or not os.path.isfile(path):
    return None
  record = files.read_json(path, "pruning record", RECORD_FIELDS)
  for i, module in enumerate(record["modules"]):
    if not isinstance(module, dict) or not isinstance(module.get("path"), str) or not isinstance(module.get("layer"),
                                                                                                int):
      raise SparsityError(f"{path}: modules[{i}] is not an object with a string 'path' and an integer 'layer'")
  return record


def keep_zeros(merged, base, record: dict | None):
  """`merged` (a params tree) with every weight that is zero in `base` at the recorded modules set to zero:
  a merged adapter's delta (LoRA's dense B @ A) masked by the pruned base's pattern. Other leaves unchanged."""
  if not record or not record["modules"]:
    return merged
  flat, base_flat = rules.flatten(merged), rules.flatten(base)
  layers: dict[str, list[int]] = {}
  for module in record["modules"]:
    layers.setdefault(module["path"], []).append(module["layer"])
  for path, which in layers.items():
    if path not in flat or path not in base_flat:
      continue
    value, zero = as_dense(flat[path]), as_dense(base_flat[path]) == 0
    if zero.shape != value.shape:
      raise SparsityError(f"{RECORD}: {path} has shape {tuple(value.shape)} merged but {tuple(zero.shape)} in the base")
    recorded = np.zeros(zero.shape[:1], bool)
    recorded[[i for i in which if 0 <= i < len(recorded)]] = True
    zero = zero & jnp.asarray(recorded).reshape((-1,) + (1,) * (zero.ndim - 1))
    flat[path] = jnp.where(zero, jnp.zeros((), value.dtype), value)
  return rules.unflatten(flat)
