"""Blockwise absmax quantization of frozen base weights (QLoRA), bit-exact with bitsandbytes.

Layer 1 (imports core/ only); `bnb_numerics.py` beside it holds bitsandbytes' own arithmetic.

A weight is flattened in torch's `(out, in)` order (so blocks and packed bytes
are the ones bitsandbytes makes from the same checkpoint), cut into blocks
of `blocksize`, each block divided by its absolute maximum and mapped to the
nearest entry of a 16- or 256-entry codebook:

    nf4   the QLoRA NormalFloat codebook            4 bits, two codes per uint8 (high nibble first)
    fp4   bitsandbytes' E2M1 table                  4 bits
    int4  symmetric linear, bitsandbytes' layout    4 bits
    int8  the signed 8-bit dynamic map              8 bits

Double quantization stores the per-block absmax again in 8 bits: subtract
their mean (a float32 offset), quantize blockwise (block 256) with the dynamic
map, keep the second-level float32 scales. NF4 at block 64 then costs
4 + 8/64 + 32/(64*256) = 4.127 bits per parameter instead of 4.5.

`QuantizedTensor` is a registered pytree node: its arrays are children (so
`nn.scan` slices the layer axis and sharding sees them), shape and format are
static. Codes and block scales are stored per row of torch's `(out, in)`:
codes `[..., out, in/2]`, scales `[..., out, in/blocksize]` (the same bytes as
bitsandbytes' flat arrays, cut at row ends), so a quantized kernel shards along
its input *and* its output axis like the dense kernel, and a block never
straddles two devices (`partition_specs`). A row that is not a whole number of
blocks makes bitsandbytes' blocks cross rows; such a tensor keeps one flat row
and cannot be split. The `Linear` hook dequantizes it right before its matmul, inside
`jax.checkpoint`, so no dequantized copy of a weight is kept for the backward
pass. Quantization itself runs once, offline, in numpy.

The stored bytes are the ones bitsandbytes writes for the same weight; the
float32 details of torch and bitsandbytes this needs (torch.linspace, the tie
rule, the 8-bit rounding grid, torch's summation order for the mean) live in
`jft.quant.bnb_numerics`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jft.core import rules
from jft.quant.bnb_numerics import linspace_f32, nearest, nearest_8bit, torch_float32_mean
from jft.core.errors import JftError


class QuantizationError(JftError, ValueError):
  pass


# ----------------------------------------------------------------------------
# Codebooks (float32), as bitsandbytes defines them.
# ----------------------------------------------------------------------------

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# E2M1 magnitudes in bitsandbytes' index order (sign in the top bit), normalised by 12.
FP4 = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32) / np.float32(12)
INT4 = np.array([7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7], np.float32) / np.float32(7)


@functools.lru_cache(maxsize=None)
def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
  """The 8-bit dynamic (exponent + fraction) map of Dettmers (2015), 256 sorted float32 values."""
  values = []
  non_sign = total_bits - 1
  for i in range(max_exponent_bits):
    n = 2 ** (i + non_sign - max_exponent_bits) + 1 if signed else 2 ** (i + non_sign - max_exponent_bits + 1) + 1
    bounds = linspace_f32(0.1, 1.0, n)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
    values += list(scale * means)
    if signed:
      values += list(-scale * means)
  extra = 2 ** (non_sign - max_exponent_bits) - 1
  if extra > 0:
    bounds = linspace_f32(0.1, 1.0, extra + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
    values += list(scale * means)
    if signed:
      values += list(-scale * means)
  values += [0.0, 1.0]
  values += [0.0] * (2 ** total_bits - len(values))
  return np.sort(np.asarray(values, np.float32))


def codebook(fmt: str) -> np.ndarray:
  books = {"nf4": NF4, "fp4": FP4, "int4": INT4}
  if fmt == "int8":
    return dynamic_map()
  if fmt not in books:
    raise QuantizationError(f"unknown quantization format {fmt!r}; expected one of {FORMATS}")
  return books[fmt]


FORMATS = ("nf4", "fp4", "int4", "int8")
DQ_BLOCKSIZE = 256


# ----------------------------------------------------------------------------
# numpy quantization (offline)
# ----------------------------------------------------------------------------

def blockwise8(flat: np.ndarray, blocksize: int):
  """8-bit blockwise quantization with the dynamic map, as bitsandbytes' CPU
  `quantize_blockwise` does it: value / absmax (a true division), then `bnb_numerics.nearest_8bit`.

  An all-zero block gives 0 / 0, which bitsandbytes codes 0 (the map's -1 end, times absmax 0), so NaN
  is coded as -1. Double quantization meets it whenever all block scales equal their mean (one block)."""
  flat = np.asarray(flat, np.float32).reshape(-1)
  pad = (-flat.size) % blocksize
  blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, blocksize)
  absmax = np.abs(blocks).max(axis=1).astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    scaled = (blocks / absmax[:, None]).astype(np.float32).reshape(-1)[: flat.size]
  return nearest_8bit(np.nan_to_num(scaled, nan=-1.0), dynamic_map()), absmax


def blockwise(flat: np.ndarray, blocksize: int, book: np.ndarray):
  """4-bit: float32 [n] -> (codes uint8 [n], absmax float32 [ceil(n / blocksize)]),
  as bitsandbytes' reference `quantize_4bit` (multiply by 1/absmax, torch.bucketize). A partial
  last block is scaled by the absmax of its own values, never padded (its codes stop at n)."""
  flat = np.asarray(flat, np.float32).reshape(-1)
  n = flat.size
  full = n - n % blocksize
  blocks = flat[:full].reshape(-1, blocksize)
  absmax = np.abs(blocks).max(axis=1) if full else np.zeros((0,), np.float32)
  inv = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
  scaled = [np.clip(blocks * inv[:, None], -1, 1).reshape(-1)]
  if n % blocksize:
    tail_max = np.maximum(np.abs(flat[full:]).max(), np.float32(1e-38))
    absmax = np.concatenate([absmax, [tail_max]]).astype(np.float32)
    scaled.append(np.clip(flat[full:] / tail_max, -1, 1))
  return nearest(np.concatenate(scaled).astype(np.float32), book), absmax.astype(np.float32)


def pack4(codes: np.ndarray, book: np.ndarray) -> np.ndarray:
  """Two codes per byte, high nibble first. An odd count fills the last low nibble with the
  code of 0.0 (NF4 7, FP4 0), as bitsandbytes pads the scaled values with 0.0 before coding them,
  so the packed bytes match its own; dequantization drops that nibble whatever it holds."""
  if codes.size % 2:
    codes = np.concatenate([codes, nearest(np.zeros(1, np.float32), book)])
  return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass
class QuantizedTensor:
  """A frozen quantized weight. Arrays may carry leading (layer) axes.

  codes         uint8 [..., rows, bytes]    packed codes (two per byte for 4-bit formats)
  absmax        float32 [..., rows, blocks] per-block scales (None with double quantization)
  absmax_codes  uint8 [..., rows, blocks]   double quantization: 8-bit scales ...
  absmax_scale  float32 [..., all blocks / 256]  ... their second-level scales (flat, as bitsandbytes)
  absmax_offset float32 [...]               ... and the subtracted mean

  rows is the stored `out` dimension when `in` is a multiple of the block size
  (`row_layout`), else 1 (bitsandbytes' blocks cross rows; not shardable).
  stored_shape  the weight's shape as quantized: torch's (out, in)
  transposed    True when the model uses it as (in, out) (a Flax kernel)

  `shape`/`ndim`/`size` describe the dense array it stands for, so code that
  only asks for shapes (LoRA init, parameter counts) treats it like the kernel.
  """
  codes: jax.Array
  absmax: Optional[jax.Array]
  absmax_codes: Optional[jax.Array]
  absmax_scale: Optional[jax.Array]
  absmax_offset: Optional[jax.Array]
  stored_shape: tuple
  fmt: str
  blocksize: int
  dtype: str = "float32"
  transposed: bool = True

  def tree_flatten(self):
    children = (self.codes, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset)
    return children, (self.stored_shape, self.fmt, self.blocksize, self.dtype, self.transposed)

  def tree_flatten_with_keys(self):
    children, aux = self.tree_flatten()
    return [(jax.tree_util.GetAttrKey(n), c) for n, c in zip(_CHILDREN, children)], aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def double_quant(self) -> bool:
    return self.absmax_codes is not None

  @property
  def lead(self) -> tuple:
    return tuple(self.codes.shape[:-2])

  @property
  def row_layout(self) -> bool:
    return row_layout(self.stored_shape, self.blocksize)

  @property
  def shape(self) -> tuple:
    """Shape of the dense array this stands for, as the model sees it."""
    inner = tuple(reversed(self.stored_shape)) if self.transposed else tuple(self.stored_shape)
    return self.lead + inner

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    """Bytes actually stored."""
    arrays = (self.codes, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset)
    return int(sum(a.size * a.dtype.itemsize for a in arrays if a is not None))

  @property
  def bits_per_param(self) -> float:
    return 8 * self.nbytes / self.size


def row_layout(stored_shape, blocksize: int) -> bool:
  """Whether every row of the stored (out, in) matrix is a whole number of blocks."""
  return stored_shape[1] % blocksize == 0


def quantize_array(weight, fmt: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   transposed: bool = True) -> QuantizedTensor:
  """Quantize one weight (leading axes = stacked layers, each quantized on its own).

  `transposed=True` takes a Flax kernel `[..., in, out]` and stores it as
  torch's `(out, in)`, the layout bitsandbytes quantizes.
  """
  book = codebook(fmt)
  w = np.asarray(weight, np.float32)
  if transposed:
    w = np.swapaxes(w, -1, -2)
  inner, lead = w.shape[-2:], w.shape[:-2]
  flat = w.reshape(-1, int(np.prod(inner)))
  out = {"codes": [], "absmax": [], "absmax_codes": [], "absmax_scale": [], "absmax_offset": []}
  rows = inner[0] if row_layout(inner, blocksize) else 1
  by_row = lambda a: np.reshape(a, (rows, -1))
  for matrix in flat:
    codes, absmax = blockwise8(matrix, blocksize) if fmt == "int8" else blockwise(matrix, blocksize, book)
    out["codes"].append(by_row(codes if fmt == "int8" else pack4(codes, book)))
    if double_quant:
      offset = torch_float32_mean(absmax)
      c2, s2 = blockwise8(absmax - offset, DQ_BLOCKSIZE)
      out["absmax_codes"].append(by_row(c2)), out["absmax_scale"].append(s2), out["absmax_offset"].append(offset)
    else:
      out["absmax"].append(by_row(absmax))
  arrays = {k: (np.reshape(np.stack(v), tuple(lead) + np.shape(v[0])) if v else None) for k, v in out.items()}
  return QuantizedTensor(**{k: (jnp.asarray(v) if v is not None else None) for k, v in arrays.items()},
                         stored_shape=tuple(int(d) for d in inner), fmt=fmt, blocksize=blocksize,
                         dtype=str(np.asarray(weight).dtype) if hasattr(weight, "dtype") else "float32",
                         transposed=transposed)


# ----------------------------------------------------------------------------
# JAX dequantization (on the fly, traced)
# ----------------------------------------------------------------------------

def block_scales(q: QuantizedTensor):
  """float32 [..., rows, blocks per row].

  The second-level scales count blocks over the whole matrix (bitsandbytes'
  order), so each block looks its scale up by its flat index; the lookup is
  elementwise in the block, so it runs per shard.
  """
  if not q.double_quant:
    return q.absmax
  dyn = jnp.asarray(dynamic_map())
  rows, per_row = q.absmax_codes.shape[-2:]
  flat_index = jnp.arange(rows)[:, None] * per_row + jnp.arange(per_row)[None, :]
  scale = jnp.take(q.absmax_scale, flat_index // DQ_BLOCKSIZE, axis=-1)
  return dyn[q.absmax_codes.astype(jnp.int32)] * scale + q.absmax_offset[..., None, None]


def dequantize(q: QuantizedTensor, dtype=jnp.float32):
  """The dense weight (float32 arithmetic as bitsandbytes, then cast), in the model's layout."""
  book = jnp.asarray(codebook(q.fmt))
  rows = q.codes.shape[-2]
  if q.fmt == "int8":
    idx = q.codes.astype(jnp.int32)
  else:
    idx = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=-1).reshape(*q.lead, rows, -1).astype(jnp.int32)
  n = int(np.prod(q.stored_shape)) // rows  # values per stored row
  scales = block_scales(q)
  blocks = scales.shape[-1]
  values = book[idx][..., :n]
  values = jnp.pad(values, [(0, 0)] * (len(q.lead) + 1) + [(0, blocks * q.blocksize - n)])
  values = (values.reshape(*q.lead, rows, blocks, q.blocksize) * scales[..., None])
  values = values.reshape(*q.lead, rows, -1)[..., :n]
  w = values.reshape(*q.lead, *q.stored_shape)
  if q.transposed:
    w = jnp.swapaxes(w, -1, -2)
  return w.astype(dtype)


def matmul(x, q: QuantizedTensor, dtype):
  """x @ dequantize(q) without keeping the dense weight for the backward pass.

  Under `jax.checkpoint` the residuals are x, the packed codes and the
  product; the backward recomputes the dequantized weight for dx. The product
  is saveable so that a layer remat policy that keeps matmul outputs (`dots`,
  the default) keeps this one too instead of redoing it (4.96 vs 5.21 s per
  QLoRA step on the 58M race model, same memory).
  """
  f = jax.checkpoint(lambda x, q: jnp.dot(x, dequantize(q, dtype)),
                     policy=jax.checkpoint_policies.checkpoint_dots, prevent_cse=False)
  return f(x, q)


def partition_specs(q: QuantizedTensor, dense_spec, where: str = "quantized kernel") -> QuantizedTensor:
  """PartitionSpecs of each stored array, given the spec of the dense kernel it stands for.

  The dense spec is `(*lead, in, out)` (as the model sees a Flax kernel);
  codes and block scales are stored `(*lead, out, in/k)`, so they take the
  same mesh axes with the last two swapped. The second-level double-quant
  scales (one float per 256 blocks) and the offset shard only along the
  layer axes. Whether an axis divides is checked on each array by the caller,
  so `in/blocksize` not dividing the mesh axis is an error, never a split block.
  """
  from jax.sharding import PartitionSpec as P

  spec = tuple(dense_spec) + (None,) * (q.ndim - len(tuple(dense_spec)))
  lead, inner = spec[: len(q.lead)], spec[len(q.lead):]
  stored = tuple(reversed(inner)) if q.transposed else tuple(inner)
  if not q.row_layout and any(a is not None for a in stored):
    raise QuantizationError(
        f"{where}: its rows ({q.stored_shape[1]} values) are not a whole number of blocks of {q.blocksize}, "
        f"so its blocks cross rows and it cannot be split along {stored}; quantize with a block size that "
        f"divides {q.stored_shape[1]}, or do not shard this kernel")
  rows = P(*lead, *stored)
  return QuantizedTensor(
      codes=rows, absmax=rows if q.absmax is not None else None,
      absmax_codes=rows if q.absmax_codes is not None else None,
      absmax_scale=P(*lead, None) if q.absmax_scale is not None else None,
      absmax_offset=P(*lead) if q.absmax_offset is not None else None,
      stored_shape=q.stored_shape, fmt=q.fmt, blocksize=q.blocksize, dtype=q.dtype, transposed=q.transposed)


def as_dense(kernel, dtype=jnp.float32):
  return dequantize(kernel, dtype) if isinstance(kernel, QuantizedTensor) else kernel.astype(dtype)


# ----------------------------------------------------------------------------
# Whole trees
# ----------------------------------------------------------------------------

def rules_for(format: str) -> rules.Rules:
  """What a run's `quant.format` quantizes: every linear in the blocks; embeddings, lm_head, norms stay."""
  return ((r"layers/.*/kernel", format),)


DEFAULT_RULES = rules_for("nf4")


# ----------------------------------------------------------------------------
# Serialization: a quantized tree as flat tensors + JSON metadata (safetensors)
# ----------------------------------------------------------------------------

_CHILDREN = ("codes", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")


def to_tensors(params) -> tuple[dict, dict]:
  """-> ({name: numpy array}, {path: static fields}) for a tree that may hold QuantizedTensors."""
  tensors, meta = {}, {}
  for path, leaf in rules.flatten(params).items():
    if isinstance(leaf, QuantizedTensor):
      for child in _CHILDREN:
        value = getattr(leaf, child)
        if value is not None:
          tensors[f"{path}:{child}"] = np.asarray(value)
      meta[path] = {"stored_shape": list(leaf.stored_shape), "fmt": leaf.fmt, "blocksize": leaf.blocksize,
                    "dtype": leaf.dtype, "transposed": leaf.transposed, "layout": "rows"}
    else:
      tensors[path] = np.asarray(leaf)
  return tensors, meta


def from_tensors(tensors: dict, meta: dict, where: str = "quantized checkpoint"):
  flat = {}
  for name, value in tensors.items():
    if ":" not in name:
      flat[name] = jnp.asarray(value)
  for path, info in meta.items():
    missing = [c for c in ("codes",) if f"{path}:{c}" not in tensors]
    if missing:
      raise QuantizationError(f"{where}: {path} has metadata but no {missing[0]} tensor")
    children = {c: (np.asarray(tensors[f"{path}:{c}"]) if f"{path}:{c}" in tensors else None) for c in _CHILDREN}
    if info.get("layout") != "rows":  # written before codes were stored per row: same bytes, one more axis
      rows = info["stored_shape"][0] if row_layout(info["stored_shape"], info["blocksize"]) else 1
      for c in ("codes", "absmax", "absmax_codes"):
        if children[c] is not None:
          children[c] = children[c].reshape(*children[c].shape[:-1], rows, -1)
    children = {c: (jnp.asarray(v) if v is not None else None) for c, v in children.items()}
    flat[path] = QuantizedTensor(**children, stored_shape=tuple(info["stored_shape"]), fmt=info["fmt"],
                                 blocksize=info["blocksize"], dtype=info["dtype"], transposed=info["transposed"])
  return rules.unflatten(flat)


@dataclasses.dataclass(frozen=True)
class Summary:
  tensors: int
  params: int
  bytes_before: int
  bytes_after: int

  @property
  def bits_per_param(self) -> float:
    return 8 * self.bytes_after / self.params if self.params else 0.0

  def __str__(self):
    return (f"quantized {self.tensors} tensors, {self.params:,} params: "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({self.bits_per_param:.3f} bits/param)")


def quantize(params, rules_: rules.Rules = DEFAULT_RULES, blocksize: int = 64, double_quant: bool = True,
             verbose: bool = True):
  """Quantize the kernels the rules select (value = format, or None to keep) -> (params, Summary)."""
  flat = rules.flatten(params)
  for _, fmt in rules_:
    if fmt is not None and fmt not in FORMATS:
      raise QuantizationError(f"rule format {fmt!r}; expected one of {FORMATS} or None")
  chosen = rules.assign(rules_, flat, default=None, what="quantization rule")
  tensors = n_params = before = after = 0
  for path, fmt in chosen.items():
    if fmt is None or isinstance(flat[path], QuantizedTensor):
      continue
    if not path.endswith("/kernel") or np.ndim(flat[path]) < 2:
      raise QuantizationError(f"{path}: only linear kernels can be quantized (rule gave {fmt!r})")
    w = flat[path]
    q = quantize_array(w, fmt, blocksize, double_quant)
    flat[path] = q
    tensors += int(np.prod(q.lead))  # per-layer matrices, not stacked arrays
    n_params += q.size
    before += int(np.prod(w.shape)) * w.dtype.itemsize
    after += q.nbytes
  summary = Summary(tensors, n_params, before, after)
  if verbose:
    print(summary, file=sys.stderr)
  return rules.unflatten(flat), summary


def abstract_quantize(params, rules_: rules.Rules = DEFAULT_RULES, blocksize: int = 64, double_quant: bool = True):
  """`quantize` on shapes only (ShapeDtypeStructs in, QuantizedTensors of them out).

  For memory estimates of models whose weights are not here: the stored
  arrays have exactly the shapes `quantize_array` would give them.
  """
  flat = rules.flatten(params)
  chosen = rules.assign(rules_, flat, default=None, what="quantization rule")
  sds = jax.ShapeDtypeStruct
  for path, fmt in chosen.items():
    if fmt is None:
      continue
    *lead, d_in, d_out = flat[path].shape
    stored = (d_out, d_in)
    rows = d_out if row_layout(stored, blocksize) else 1
    n = d_in * d_out
    blocks = -(-n // blocksize)
    per_row = (n // rows) if fmt == "int8" else -(-n // 2) // rows
    scales = sds((*lead, rows, blocks // rows), np.uint8 if double_quant else np.float32)
    flat[path] = QuantizedTensor(
        codes=sds((*lead, rows, per_row), np.uint8), absmax=None if double_quant else scales,
        absmax_codes=scales if double_quant else None,
        absmax_scale=sds((*lead, -(-blocks // DQ_BLOCKSIZE)), np.float32) if double_quant else None,
        absmax_offset=sds(tuple(lead), np.float32) if double_quant else None,
        stored_shape=stored, fmt=fmt, blocksize=blocksize, dtype=str(flat[path].dtype), transposed=True)
  return rules.unflatten(flat)


def is_quantized(leaf) -> bool:
  return isinstance(leaf, QuantizedTensor)
