"""Softmax attention, three ways, and the choice between them (`model.attention`).

* `xla`: einsum scores in float32, a boolean mask, softmax, einsum with the values; without a
  cache the queries go in blocks that skip the keys after each block (`causal_blocks`).
* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash attention
  (CUDA GPUs, bfloat16/float16 compute); the mask goes in as cuDNN's bias, `is_causal` lets it
  skip the blocks above the diagonal.
* `pallas`: jft's flash attention kernel (`jax.experimental.pallas`): online softmax over key
  blocks, never the `[queries, keys]` score matrix; a `custom_vjp` whose backward is two Pallas
  kernels (dq; dk and dv) fed by the forward's log-sum-exp. On CPU it runs in interpret mode
  (tests); on a GPU it is meant for the Triton lowering (power-of-two blocks of at least 16), which
  has not run yet. It is one device's kernel: on a mesh of several devices XLA gathers its
  operands (no shard_map yet), so `auto` never picks it.
* `auto`: cudnn where it applies (a CUDA GPU, 16-bit compute, no cache, head_dim a multiple
  of 8 up to 128, even lengths), xla otherwise. TPU splash attention is not wired: auto stays
  on xla there.

Every implementation takes the same arguments: q `[b, t, kv_heads, groups, d]`, k/v
`[b, s, kv_heads, d]` (grouped-query attention: `groups` query heads per key head) and a
boolean mask `[b, t, s]` (padding on either side, packed segments, sliding window, prefix keys:
`jft.models.transformer.attention_mask_4d` builds it). Rows that see no key at all (padding
queries) have an unspecified output that nothing reads, and no gradient flows back from them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jft.core.errors import JftError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
MASKED = -1e30  # finite, so fully masked (padding) rows give no NaN
CAUSAL_BLOCK = 128  # query positions per block of `causal_blocks`
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class AttentionError(JftError, ValueError):
  """An attention implementation asked for where it cannot run."""


# ---- the choice -----------------------------------------------------------------------------------

def _is_cuda() -> bool:
  if jax.default_backend() != "gpu":
    return False
  return "cuda" in str(getattr(jax.devices()[0].client, "platform_version", "")).lower()


def resolve(name: str, *, dtype, head_dim: int, t: int, s: int, cached: bool) -> str:
  """The implementation `name` stands for here ("auto" picks); an explicit one that cannot run is refused."""
  if name not in IMPLEMENTATIONS:
    raise AttentionError(f"model.attention={name!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
  dtype = jnp.dtype(dtype)
  if name == "auto":
    fits = (dtype in HALF_DTYPES and not cached and head_dim % 8 == 0 and head_dim <= 128
            and t % 2 == 0 and s % 2 == 0)
    return "cudnn" if fits and _is_cuda() else "xla"
  if name == "cudnn":
    if not _is_cuda():
      raise AttentionError(f"model.attention=cudnn needs a CUDA GPU (cuDNN flash attention); this backend is "
                           f"{jax.default_backend()}: use auto, xla or pallas")
    if dtype not in HALF_DTYPES:
      raise AttentionError(f"model.attention=cudnn needs model.dtype=bfloat16 (cuDNN has no {dtype} flash "
                           f"attention); use auto or xla for {dtype}")
  return name


def check(name: str, dtype) -> None:
  """Refuse an explicit implementation that cannot run on this backend or dtype, before any weights load."""
  resolve(name, dtype=dtype, head_dim=8, t=2, s=2, cached=False)


def attend(q, k, v, mask, dtype, *, implementation: str = "auto", causal: bool = True):
  """Attention by the chosen implementation -> [b, t, kv_heads, groups, d] in `dtype`.

  `causal`: no cache, so the mask is causal in index space with the queries at the end of the
  keys (prefix keys before them); implementations use it only to skip work the mask rules out.
  """
  name = resolve(implementation, dtype=dtype, head_dim=q.shape[-1], t=q.shape[1], s=k.shape[1],
                 cached=not causal)
  if name == "xla":
    return xla_attention(q, k, v, mask, dtype, causal=causal)
  if name == "cudnn":
    return dot_product_attention(q, k, v, mask, dtype, causal=causal, implementation="cudnn")
  return pallas_attention(q, k, v, mask, causal=causal).astype(dtype)


# ---- xla ------------------------------------------------------------------------------------------

def causal_blocks(t: int, block: int = CAUSAL_BLOCK):
  """(start, end) of query blocks; block i only needs the keys before `end`.

  Without a cache the mask is causal in index space, so splitting the queries
  skips the masked upper-right key blocks: 1/4 of the attention FLOPs (and of
  its saved probabilities) at 2 blocks, 3/8 at 4.
  """
  return [(start, min(start + block, t)) for start in range(0, t, block)]


def softmax_attention(q, k, v, mask, dtype):
  """Softmax attention: q [b, t, kv_heads, groups, d], k/v [b, s, kv_heads, d], mask [b, t, s] -> [b, t, ...]."""
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
  scores = jnp.where(mask[:, None, None, :, :], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def xla_attention(q, k, v, mask, dtype, *, causal: bool):
  if not causal:
    return softmax_attention(q, k, v, mask, dtype)
  t, s = q.shape[1], k.shape[1]  # keys after the last query of a block are masked for all of it: skip them
  return jnp.concatenate([
      softmax_attention(q[:, start:end], k[:, :s - t + end], v[:, :s - t + end], mask[:, start:end, :s - t + end],
                        dtype)
      for start, end in causal_blocks(t)], axis=1)


# ---- jax.nn.dot_product_attention (cuDNN) ---------------------------------------------------------

def dot_product_attention(q, k, v, mask, dtype, *, causal: bool, implementation: str = "cudnn"):
  """Through `jax.nn.dot_product_attention`; `implementation="xla"` runs the same call on any backend (tests)."""
  b, t, kv, g, d = q.shape
  q, k, v = (a.astype(dtype) for a in (q, k, v))
  # is_causal only where it agrees with the mask's diagonal (no prefix keys, no cache): cuDNN then skips
  # the upper blocks; the mask (padding, segments, window) rides along as its bias.
  out = jax.nn.dot_product_attention(q.reshape(b, t, kv * g, d), k, v, mask=mask[:, None],
                                     is_causal=causal and k.shape[1] == t, implementation=implementation)
  return out.reshape(b, t, kv, g, d)


# ---- pallas ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shape of one Pallas attention call (hashable: a custom_vjp static argument)."""
  t: int  # queries (unpadded)
  s: int  # keys (unpadded)
  groups: int  # query heads per key head
  block_q: int
  block_k: int
  causal: bool  # skip key blocks after a query block's last row (queries at the end of the keys)
  interpret: bool

  @property
  def tp(self):
    return -(-self.t // self.block_q) * self.block_q

  @property
  def sp(self):
    return -(-self.s // self.block_k) * self.block_k

  def kv_end(self, i):
    """Key blocks query block i loops over (all of them without `causal`)."""
    nk = self.sp // self.block_k
    if not self.causal:
      return nk
    last_key = (self.s - self.t) + (i + 1) * self.block_q  # one past the last key the block's last row sees
    return jnp.minimum((last_key + self.block_k - 1) // self.block_k, nk)

  def q_start(self, j):
    """First query block that sees key block j (0 without `causal`)."""
    if not self.causal:
      return 0
    first_row = j * self.block_k - (self.s - self.t)
    return jnp.maximum(first_row, 0) // self.block_q


def _block(n: int, want: int, interpret: bool) -> int:
  """A power-of-two block no longer than needed (Triton wants powers of two of at least 16)."""
  size = min(want, 1 << max(n - 1, 0).bit_length())
  return size if interpret else max(size, 16)


def _scores(q, k, keep, scale):
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) / scale
  return jnp.where(keep, s, MASKED)


def _forward_kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, plan: _Plan, scale: float):
  q = q_ref[...]
  bq, bk = plan.block_q, plan.block_k

  def body(j, carry):
    acc, m, l = carry
    start = pl.multiple_of(j * bk, bk)
    v = v_ref[pl.ds(start, bk), :]
    s = _scores(q, k_ref[pl.ds(start, bk), :], mask_ref[:, pl.ds(start, bk)] != 0, scale)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l * alpha + p.sum(axis=-1)

  init = (jnp.zeros((bq, q.shape[-1]), jnp.float32), jnp.full((bq,), MASKED, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, plan.kv_end(pl.program_id(2)), body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan: _Plan, scale: float):
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  bk = plan.block_k

  def body(j, dq):
    start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    keep = mask_ref[:, pl.ds(start, bk)] != 0
    p = jnp.where(keep, jnp.exp(_scores(q, k, keep, scale) - lse[:, None]), 0.0)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = jax.lax.fori_loop(0, plan.kv_end(pl.program_id(2)), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq / scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, plan: _Plan,
                scale: float):
  k, v = k_ref[...], v_ref[...]
  bq = plan.block_q
  t_dims = (((0,), (0,)), ((), ()))  # contract the query rows: a^T b

  def body(i, carry):
    dk, dv = carry
    start = pl.multiple_of(i * bq, bq)
    q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
    lse, delta = lse_ref[pl.ds(start, bq)], delta_ref[pl.ds(start, bq)]
    keep = mask_ref[pl.ds(start, bq), :] != 0
    p = jnp.where(keep, jnp.exp(_scores(q, k, keep, scale) - lse[:, None]), 0.0)
    dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, t_dims, preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, t_dims, preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(plan.q_start(pl.program_id(2)), plan.tp // bq, body, (zeros, zeros))
  dk_ref[...] = (dk / scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(plan: _Plan, d: int):
  """BlockSpecs over (batch, query head, block): q-like [b, tp, heads, d], kv-like [b, sp, kv_heads, d]."""
  g = plan.groups
  return dict(
      q_block=pl.BlockSpec((None, plan.block_q, None, d), lambda b, h, i: (b, i, h, 0)),
      q_all=pl.BlockSpec((None, plan.tp, None, d), lambda b, h, j: (b, 0, h, 0)),
      kv_all=pl.BlockSpec((None, plan.sp, None, d), lambda b, h, i: (b, 0, h // g, 0)),
      kv_block=pl.BlockSpec((None, plan.block_k, None, d), lambda b, h, j: (b, j, h // g, 0)),
      head_kv_block=pl.BlockSpec((None, plan.block_k, None, d), lambda b, h, j: (b, j, h, 0)),
      mask_rows=pl.BlockSpec((None, plan.block_q, plan.sp), lambda b, h, i: (b, i, 0)),
      mask_cols=pl.BlockSpec((None, plan.tp, plan.block_k), lambda b, h, j: (b, 0, j)),
      row_block=pl.BlockSpec((None, None, plan.block_q), lambda b, h, i: (b, h, i)),
      row_all=pl.BlockSpec((None, None, plan.tp), lambda b, h, j: (b, h, 0)),
  )


def _flash_forward(plan: _Plan, q, k, v, mask):
  """q [b, tp, heads, d], k/v [b, sp, kv_heads, d], mask int8 [b, tp, sp] -> (out like q, lse [b, heads, tp])."""
  b, _, heads, d = q.shape
  sp = _specs(plan, d)
  return pl.pallas_call(
      functools.partial(_forward_kernel, plan=plan, scale=math.sqrt(d)),
      grid=(b, heads, plan.tp // plan.block_q),
      in_specs=[sp["q_block"], sp["kv_all"], sp["kv_all"], sp["mask_rows"]],
      out_specs=[sp["q_block"], sp["row_block"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, heads, plan.tp), jnp.float32)],
      interpret=plan.interpret, name="jft_flash_forward")(q, k, v, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: _Plan, q, k, v, mask):
  return _flash_forward(plan, q, k, v, mask)[0]


def _flash_fwd(plan, q, k, v, mask):
  out, lse = _flash_forward(plan, q, k, v, mask)
  return out, (q, k, v, mask, out, lse)


def _flash_bwd(plan, residuals, do):
  q, k, v, mask, out, lse = residuals
  b, _, heads, d = q.shape
  kv_heads = k.shape[2]
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
  sp = _specs(plan, d)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan, scale=math.sqrt(d)),
      grid=(b, heads, plan.tp // plan.block_q),
      in_specs=[sp["q_block"], sp["kv_all"], sp["kv_all"], sp["mask_rows"], sp["q_block"], sp["row_block"],
                sp["row_block"]],
      out_specs=sp["q_block"], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=plan.interpret, name="jft_flash_dq")(q, k, v, mask, do, lse, delta)
  # dk, dv per query head, summed over each key head's group afterwards.
  per_head = jax.ShapeDtypeStruct((b, plan.sp, heads, d), jnp.float32)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, plan=plan, scale=math.sqrt(d)),
      grid=(b, heads, plan.sp // plan.block_k),
      in_specs=[sp["q_all"], sp["kv_block"], sp["kv_block"], sp["mask_cols"], sp["q_all"], sp["row_all"],
                sp["row_all"]],
      out_specs=[sp["head_kv_block"], sp["head_kv_block"]], out_shape=[per_head, per_head],
      interpret=plan.interpret, name="jft_flash_dkv")(q, k, v, mask, do, lse, delta)
  group_sum = lambda x, like: x.reshape(b, plan.sp, kv_heads, plan.groups, d).sum(3).astype(like.dtype)
  return dq, group_sum(dk, k), group_sum(dv, v), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q, k, v, mask, *, causal: bool, block_q: int = 128, block_k: int = 128,
                     interpret: bool | None = None):
  """Flash attention in Pallas: same arguments and result as `softmax_attention` (in q's dtype).

  Lengths are padded up to whole blocks (padded keys masked, padded query rows dropped).
  `interpret` defaults to True off GPU/TPU, so the kernel runs (slowly) on CPU.
  """
  b, t, kv, g, d = q.shape
  s = k.shape[1]
  if interpret is None:
    interpret = jax.default_backend() not in ("gpu", "tpu")
  plan = _Plan(t, s, g, _block(t, block_q, interpret), _block(s, block_k, interpret), causal, interpret)
  qh = jnp.pad(q.reshape(b, t, kv * g, d), ((0, 0), (0, plan.tp - t), (0, 0), (0, 0)))
  pad_kv = lambda a: jnp.pad(a.astype(q.dtype), ((0, 0), (0, plan.sp - s), (0, 0), (0, 0)))
  m = jnp.pad(mask.astype(jnp.int8), ((0, 0), (0, plan.tp - t), (0, plan.sp - s)))
  out = _flash(plan, qh, pad_kv(k), pad_kv(v), m)
  return out[:, :t].reshape(b, t, kv, g, d)
