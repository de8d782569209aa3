"""torch/bitsandbytes numerics reproduced bit for bit, for `jft.quant`.

Quantizing a checkpoint here gives the same packed codes, absmax codes,
second-level scales and offsets as bitsandbytes 0.50.2 on the CPU, so files
are interchangeable with it and tests can compare bytes rather than
tolerances. Getting there takes a few float32 details of torch and
bitsandbytes that a plain numpy version would round differently in the last
bit (moving a code now and then); each function below says which one it
reproduces. The format itself (codebooks, blocks, layout) is in `jft.quant`.
"""

from __future__ import annotations

import functools

import numpy as np


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace in float32, bit for bit: forward from `start` for the first half,
  backward from `end` after, each value one fused multiply-add (a float32 product is
  exact in float64, so float64 arithmetic rounded once to float32 is that FMA).

  bitsandbytes builds its 8-bit dynamic map from these bounds."""
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float64((end32 - start32) / np.float32(steps - 1))
  i = np.arange(steps)
  forward = (np.float64(start32) + step * i).astype(np.float32)
  backward = (np.float64(end32) - step * (steps - i - 1)).astype(np.float32)
  return np.where(i < steps // 2, forward, backward).astype(np.float32)


def nearest(scaled: np.ndarray, book: np.ndarray) -> np.ndarray:
  """Index of the nearest codebook entry; ties go to the lower sorted entry (torch.bucketize
  over the float32 midpoints), so a value exactly between two entries gets bitsandbytes' code."""
  order = np.argsort(book, kind="stable")
  ordered = book[order]
  mid = (ordered[:-1] + ordered[1:]) / np.float32(2)
  return order[np.searchsorted(mid, scaled, side="left")].astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _lut_8bit(book: bytes) -> np.ndarray:
  """Code of each point of a uniform 16-bit grid over [-1, 1] (nearest entry of `book`,
  float32 bytes so the table is cached per codebook)."""
  grid = (np.arange(65536, dtype=np.float64) * 2 / 65535 - 1).astype(np.float32)
  return nearest(grid, np.frombuffer(book, np.float32))


def nearest_8bit(x: np.ndarray, book: np.ndarray) -> np.ndarray:
  """bitsandbytes' CPU rule for 8-bit codes: round the normalised value to a 16-bit grid,
  ((v + 1) / 2) * 65535 + 0.5 truncated, in float32, then look its code up.

  Near a midpoint this can pick the farther entry (the grid step is 3e-5), and
  bit-exactness needs the same choice.
  """
  v = np.clip(np.asarray(x, np.float32), -1, 1)
  idx = ((v + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5)).astype(np.int64)
  return _lut_8bit(np.asarray(book, np.float32).tobytes())[idx]


def torch_float32_mean(x: np.ndarray) -> np.float32:
  """`torch.Tensor.mean()` of a contiguous float32 vector on the CPU, bit for bit.

  Double quantization subtracts the mean of the block scales, and bitsandbytes
  takes it with torch; a last-bit difference would move some 8-bit scale codes.
  torch sums 8-lane vectors (AVX2 `Vectorized<float>`) through its cascade
  (4 interleaved rows, 4 levels of partial sums, level step 2^max(4, ceil(log2 n)/4)),
  then adds the scalar tail, then the 8 lanes, all in float32; mean = sum / n.
  """
  x = np.asarray(x, np.float32).reshape(-1)
  lanes, ilp, levels = 8, 4, 4
  vectors = x[: x.size // lanes * lanes].reshape(-1, lanes)

  def cascade(rows):  # rows [size, ...] -> float32 sum over axis 0, torch's order
    size = rows.shape[0]
    power = max(4, (int(np.ceil(np.log2(size))) if size > 1 else 0) // levels)
    step, mask = 1 << power, (1 << power) - 1
    acc = np.zeros((levels,) + rows.shape[1:], np.float32)
    i = 0
    while i + step <= size:
      for _ in range(step):
        acc[0] += rows[i]
        i += 1
      for j in range(1, levels):
        acc[j] += acc[j - 1]
        acc[j - 1] = 0
        if i & (mask << (j * power)):
          break
    for row in rows[i:]:
      acc[0] += row
    for j in range(1, levels):
      acc[0] += acc[j]
    return acc[0]

  n_ilp = vectors.shape[0] // ilp
  partial = (cascade(vectors[: n_ilp * ilp].reshape(n_ilp, ilp, lanes)) if n_ilp
             else np.zeros((ilp, lanes), np.float32))
  vec = partial[0].copy()
  for row in vectors[n_ilp * ilp:]:
    vec += row
  for k in range(1, ilp):
    vec += partial[k]
  total = np.float32(0)
  for v in x[vectors.size:]:
    total = np.float32(total + v)
  for v in vec:
    total = np.float32(total + v)
  return np.float32(total / np.float32(x.size))
