"""Next-token cross-entropy, from logits or fused with the output projection.

`next_token_loss` takes logits (evaluation, methods that change the output
layer). `head_loss` is the training path: it never materialises the
`[batch, length, vocab]` logits. The output projection and the loss run over
chunks of the sequence, and each chunk's gradient, `(softmax - onehot) @ W^T`
(and `x^T (softmax - onehot)` when the head trains), is formed right there
in the forward pass, so the backward pass only scales what is saved. The
logits, their softmax and their gradient (three vocab-sized buffers, the
largest activations of a small model's step) shrink to one chunk each, and
no matmul is repeated: the FLOPs are those of the unfused loss.
`head_logps` is the same for the per-token log-probabilities of preference
objectives (a frozen head: each token's saved gradient is scaled by its own
cotangent). `head_divergence` is distillation's: a student's and a teacher's
heads over the same chunks, GKD's generalized Jensen-Shannon divergence and its
gradient formed per chunk, so neither model's `[batch, length, vocab]` logits
exist. All run the head only where the mask asks (`_over_chunks`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jft import quant
from jft.core import rules

CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk


def shifted_targets(input_ids, loss_mask):
  """Target of position t is token t+1; the last position predicts nothing (weight 0)."""
  shift = lambda a: jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
  return shift(input_ids), shift(loss_mask).astype(jnp.float32)


def next_token_loss(logits, input_ids, loss_mask):
  """Mean cross-entropy of predicting token t+1 at t, over positions where loss_mask[t+1] = 1.

  Returns (loss, number of predicted tokens). Targets and weights shift left
  instead of the logits: slicing `[B, T, vocab]` would copy the largest
  activation of the step (and pad its gradient back).
  """
  logits = logits.astype(jnp.float32)
  targets, weights = shifted_targets(input_ids, loss_mask)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  n = jnp.maximum(weights.sum(), 1.0)
  return ((logz - picked) * weights).sum() / n, weights.sum()


def logps_of_logits(logits, input_ids, completion_mask):
  """[B, T] float32 from [B, T, V] logits: log p(token t | tokens < t) at t where completion_mask[t], else 0.

  Position 0 has no context and gets 0. Targets shift left instead of the
  logits (as `next_token_loss` does: slicing `[B, T, vocab]` would
  copy the largest activation); only the `[B, T]` result shifts back right.
  """
  logits = logits.astype(jnp.float32)
  targets, _ = shifted_targets(input_ids, completion_mask)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  next_logps = picked - logz  # position t scores token t + 1
  logps = jnp.concatenate([jnp.zeros_like(next_logps[:, :1]), next_logps[:, :-1]], axis=1)
  return jnp.where(completion_mask != 0, logps, 0.0)


class Head(NamedTuple):
  """The output projection as the fused loss reads it: `logits = x @ w` (`x @ w.T` when tied)."""
  path: str
  tied: bool


def output_head(params) -> Optional[Head]:
  """The plain output projection of a model's params, or None when a method or quantization changes it.

  Untied models project with `lm_head/kernel [d, vocab]`, tied ones with
  `embed_tokens/embedding [vocab, d]`. A method group beside the kernel
  (LoRA on lm_head...) or a quantized kernel sends the loss back to logits.
  """
  if "lm_head" in params:
    head = params["lm_head"]
    if set(head) != {"kernel"} or quant.is_quantized(head["kernel"]):
      return None
    return Head("lm_head/kernel", tied=False)
  return Head("embed_tokens/embedding", tied=True)


def model_loss(apply, params, input_ids, attention_mask, loss_mask, trained=frozenset()):
  """(mean next-token loss over `loss_mask`, tokens) of a model run by `apply(ids, mask, return_hidden=...)`.

  Through the fused head when the output projection is plain (`output_head`),
  else from the logits. `trained`: paths of trainable leaves (is the head one?).
  """
  head = output_head(params)
  out = apply(input_ids, attention_mask, return_hidden=head is not None)
  if head is None:
    return next_token_loss(out, input_ids, loss_mask)
  return head_loss(out, params, head, input_ids, loss_mask, head.path in trained)


def model_logps(apply, params, input_ids, attention_mask, completion_mask, trained=frozenset()):
  """[B, T] completion-token log-probs (`logps_of_logits`) of a model run by `apply`.

  Through `head_logps` when the output projection is plain and not in
  `trained`, else from the logits.
  """
  head = output_head(params)
  if head is None or head.path in trained:
    return logps_of_logits(apply(input_ids, attention_mask), input_ids, completion_mask)
  hidden = apply(input_ids, attention_mask, return_hidden=True)
  return head_logps(hidden, params, head, input_ids, completion_mask)


def project(x, params, head: Head):
  """Logits `x @ head` of a few positions (`x [..., d]`), e.g. where a classifier reads its label word."""
  w = rules.flatten(params)[head.path].astype(x.dtype)
  return jnp.dot(x, w.T if head.tied else w, preferred_element_type=jnp.float32)


def head_loss(hidden, params, head: Head, input_ids, loss_mask, trainable_head: bool):
  """(loss, tokens) of `next_token_loss(hidden @ head, ...)` without the full logits.

  `hidden` [B, T, d] is the final-norm output; `trainable_head` says whether
  the projection needs its gradient (it costs as much as the input's).
  """
  w = rules.flatten(params)[head.path]
  targets, weights = shifted_targets(input_ids, loss_mask)
  n = jnp.maximum(weights.sum(), 1.0)
  total = _fused(hidden, w, targets, weights / n, head.tied, trainable_head)
  return total, weights.sum()


def head_logps(hidden, params, head: Head, input_ids, completion_mask):
  """[B, T] `logps_of_logits(hidden @ head, ...)` without the full logits; the head is frozen.

  A token's log-probability has the gradient `(onehot - softmax) @ W^T` with
  respect to its hidden state, formed in the forward pass and scaled in the
  backward by the token's cotangent (DPO's per-row coefficient, GRPO's
  per-token ratio). The head's own gradient would need those cotangents
  before they exist, so a trained head takes the logits path instead.
  """
  w = jax.lax.stop_gradient(rules.flatten(params)[head.path])
  targets, weights = shifted_targets(input_ids, completion_mask)
  next_logps = _fused_logps(hidden, w, targets, (weights != 0).astype(jnp.float32), head.tied)
  logps = jnp.concatenate([jnp.zeros_like(next_logps[:, :1]), next_logps[:, :-1]], axis=1)  # t scores token t
  return jnp.where(completion_mask != 0, logps, 0.0)


def _chunk_length(b: int, t: int, vocab: int) -> int:
  """Sequence positions per chunk: about CHUNK_BYTES of float32 logits; a divisor of t when one is close."""
  want = min(t, max(1, CHUNK_BYTES // (4 * b * vocab)))
  divisor = max(c for c in range(1, want + 1) if t % c == 0)
  return divisor if 2 * divisor >= want else want  # else pad t up to a multiple of `want`


def _chunk(x, w, targets, weights, tied: bool, grads: bool, with_w_grad: bool):
  """One chunk: weighted CE per position [B, c] and, with `grads`, the gradient of their sum w.r.t. x (and w)."""
  dt = x.dtype
  wt = w.astype(dt)
  dims = (((x.ndim - 1,), (1 if tied else 0,)), ((), ()))
  logits = jax.lax.dot_general(x, wt, dims, preferred_element_type=jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = (logz - picked) * weights
  if not grads:
    return nll, None, None
  onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
  g = ((jnp.exp(logits - logz[..., None]) - onehot) * weights[..., None]).astype(dt)  # d sum(nll) / d logits
  gx, gw = _through_head(g, x, wt, tied, with_w_grad)
  return nll, gx, gw


def _through_head(g, x, wt, tied: bool, with_w_grad: bool):
  """The gradient `g` [B, c, vocab] of a chunk's logits `x @ w` taken back to x [B, c, d] (and to w)."""
  gx = jax.lax.dot_general(g, wt, (((g.ndim - 1,), (0 if tied else 1,)), ((), ())),
                           preferred_element_type=jnp.float32)
  gw = None
  if with_w_grad:
    gf, xf = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])  # one contracted token axis
    gw = jnp.dot(gf.T, xf, preferred_element_type=jnp.float32) if tied else \
        jnp.dot(xf.T, gf, preferred_element_type=jnp.float32)
  return gx, gw


def _over_chunks(x, w, targets, weights, tied, grads, with_w_grad, per_chunk=None, buffers: int = 1):
  """-> (weighted CE [B, T], gx [B, T, d] or None, gw or None), one scan over sequence chunks.

  Each row's loss-carrying positions go first (in order) and a chunk in which
  no row carries loss is skipped, so the head costs what the loss mask asks
  for: SFT's prompts, padding and all but a classification's label word take
  no output-projection matmul. `per_chunk` (default: cross-entropy, `_chunk`) may
  be another per-chunk loss: `targets` is then any tree of per-position
  `[B, T, ...]` arrays and the first result any tree of `[B, T]` values;
  `buffers` vocab-sized float32 arrays of it share the chunk's memory.
  """
  per_chunk = per_chunk or _chunk
  b, t, d = x.shape
  c = _chunk_length(b, t, w.shape[0 if tied else 1] * buffers)
  pad = -t % c  # padded positions have weight 0
  order = jnp.argsort(weights == 0, axis=1, stable=True)  # [B, T]: loss positions first
  x, weights = _along_rows(x, order), _along_rows(weights, order)
  targets = jax.tree.map(lambda a: _along_rows(a, order), targets)

  def split(a):  # [B, t, ...] -> [chunks, B, c, ...]; chunks along the sequence keep a sharded batch whole
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(b, (t + pad) // c, c, *a.shape[2:]), 1, 0)

  def body(gw, chunk):
    xs, ts, ws = chunk

    def run(gw):
      values, gx, gw_c = per_chunk(xs, w, ts, ws, tied, grads, with_w_grad)
      return (gw + gw_c if gw_c is not None else gw), (values, gx)

    def skip(gw):  # zeros shaped as `run`'s results
      return gw, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(run, gw)[1])

    return jax.lax.cond(jnp.any(ws != 0), run, skip, gw)

  gw0 = jnp.zeros(w.shape, jnp.float32) if grads and with_w_grad else None
  gw, (values, gx) = jax.lax.scan(body, gw0, (split(x), jax.tree.map(split, targets), split(weights)))
  back = jnp.argsort(order, axis=1)  # each position's own place again
  unsplit = lambda a: _along_rows(jnp.moveaxis(a, 0, 1).reshape(b, t + pad, *a.shape[3:])[:, :t], back)
  gx = None if gx is None else unsplit(gx).astype(x.dtype)
  return jax.tree.map(unsplit, values), gx, None if gw is None else gw.astype(w.dtype)


def _along_rows(a, index):
  """a[b, index[b, t], ...]: the positions of each row in `index`'s order."""
  return jnp.take_along_axis(a, index.reshape(*index.shape, *(1,) * (a.ndim - 2)), axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(x, w, targets, weights, tied: bool, with_w_grad: bool):
  return _over_chunks(x, w, targets, weights, tied, False, False)[0].sum()  # no gradient asked: the loss alone


def _fused_fwd(x, w, targets, weights, tied, with_w_grad):
  nll, gx, gw = _over_chunks(x, w, targets, weights, tied, True, with_w_grad)
  return nll.sum(), (gx, gw)


def _fused_bwd(tied, with_w_grad, res, g):
  gx, gw = res
  scale = lambda a: a * g.astype(a.dtype)
  return scale(gx), None if gw is None else scale(gw), None, None  # None: no gradient for targets, weights


_fused.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_logps(x, w, targets, weights, tied: bool):
  return -_over_chunks(x, w, targets, weights, tied, False, False)[0]  # [B, T]: log p of the next token


def _fused_logps_fwd(x, w, targets, weights, tied):
  nll, gx, _ = _over_chunks(x, w, targets, weights, tied, True, False)
  return -nll, gx


def _fused_logps_bwd(tied, gx, g):  # gx: d nll / d x per position, so d logp / d x = -gx
  return (-g[..., None] * gx).astype(gx.dtype), None, None, None  # the head is frozen (`head_logps`)


_fused_logps.defvjp(_fused_logps_fwd, _fused_logps_bwd)


# ---- Distillation: a student's and a teacher's heads over the same chunks ------------------------------

def jsd_terms(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
  """[..., vocab] terms of GKD's generalized Jensen-Shannon divergence (their sum over the vocab: one
  position's divergence), in TRL's convention: beta = 0 is KL(teacher || student), beta = 1 KL(student ||
  teacher), between them beta KL(teacher || m) + (1 - beta) KL(student || m), m = (1 - beta) student + beta
  teacher; both distributions softened by `temperature`. Float32 whatever the logits' dtype."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  if beta == 0:
    return jnp.exp(t) * (t - s)
  if beta == 1:
    return jnp.exp(s) * (s - t)
  m = jnp.logaddexp(s + jnp.log1p(-beta), t + jnp.log(beta))
  return beta * jnp.exp(t) * (t - m) + (1 - beta) * jnp.exp(s) * (s - m)


def model_divergence(apply, params, teacher_apply, teacher_params, input_ids, attention_mask, loss_mask,
                     beta: float, temperature: float = 1.0, alpha: float = 0.0, trained=frozenset()):
  """(alpha * next-token loss + (1 - alpha) * generalized JSD, metrics), both the mean over the positions
  that predict a `loss_mask` token, of a student run by `apply(ids, mask, return_hidden=...)` against a
  teacher run by `teacher_apply` (no gradient reaches it).

  Through `head_divergence` when both output projections are plain (`output_head`); a student whose head a
  method changes (LoRA on lm_head, a quantized head) takes the logits path, which forms both models'
  `[batch, length, vocab]` logits. Metrics: `jsd`, `nll` (the next-token loss) and `loss_tokens`.
  """
  student_head, teacher_head = output_head(params), output_head(teacher_params)
  fused = student_head is not None and teacher_head is not None
  student = apply(input_ids, attention_mask, return_hidden=fused)
  teacher = jax.lax.stop_gradient(teacher_apply(input_ids, attention_mask, return_hidden=fused))
  if fused:
    return head_divergence(student, params, student_head, teacher, teacher_params, teacher_head, input_ids,
                           loss_mask, beta, temperature, alpha, student_head.path in trained)
  targets, weights = shifted_targets(input_ids, loss_mask)
  n = jnp.maximum(weights.sum(), 1.0)
  jsd = (jsd_terms(student, teacher, beta, temperature).sum(-1) * weights).sum() / n
  nll, tokens = next_token_loss(student, input_ids, loss_mask)
  return (1 - alpha) * jsd + alpha * nll, {"jsd": jsd, "nll": nll, "loss_tokens": tokens}


def head_divergence(hidden, params, head: Head, teacher_hidden, teacher_params, teacher_head: Head, input_ids,
                    loss_mask, beta: float, temperature: float = 1.0, alpha: float = 0.0,
                    trainable_head: bool = False):
  """`model_divergence` from the final-norm outputs of both models (`hidden` [B, T, d], `teacher_hidden`
  [B, T, d_teacher]: the models may differ in width and depth, not in vocabulary).

  Both heads run chunk by chunk over the loss-carrying positions only; each chunk's divergence, its
  gradient with respect to the student's logits (closed form, see `_divergence_chunk`) and that gradient
  taken back to `hidden` (and to the student's head when `trainable_head`) are formed in the forward
  pass, as `head_loss` does: memory O(chunk x vocab), no matmul repeated in the backward pass.
  """
  w = rules.flatten(params)[head.path]
  wt = jax.lax.stop_gradient(rules.flatten(teacher_params)[teacher_head.path])
  if w.shape[0 if head.tied else 1] != wt.shape[0 if teacher_head.tied else 1]:
    raise ValueError(f"head_divergence: the student's head has {w.shape[0 if head.tied else 1]} tokens, the "
                     f"teacher's {wt.shape[0 if teacher_head.tied else 1]}; the two models must share one vocabulary")
  targets, weights = shifted_targets(input_ids, loss_mask)
  n = jnp.maximum(weights.sum(), 1.0)
  settings = (head.tied, teacher_head.tied, float(beta), float(temperature), float(alpha), trainable_head)
  loss, (jsd, nll) = _fused_divergence(hidden, w, jax.lax.stop_gradient(teacher_hidden), wt, targets, weights / n,
                                       *settings)
  return loss, {"jsd": jsd, "nll": nll, "loss_tokens": weights.sum()}


def _divergence_chunk(x, w, per_position, weights, tied, grads, with_w_grad, *, wt, teacher_tied, beta,
                      temperature, alpha):
  """One chunk of `head_divergence`: weighted (jsd, nll) per position [B, c] and, with `grads`, the gradient
  of sum((1 - alpha) jsd + alpha nll) w.r.t. x (and w).

  With s, t the tempered log-probs and p = exp(s), the gradient w.r.t. the student's logits z is
  (p * (g - sum(p * g))) / temperature for the gradient g of the divergence w.r.t. p taken as free:
  -exp(t) / p at beta = 0 (so p - exp(t)), s - t at beta = 1, (1 - beta) (s - log m) between.
  """
  teacher_x, targets = per_position
  dt = x.dtype
  logits_of = lambda a, k, k_tied: jax.lax.dot_general(
      a, k.astype(a.dtype), (((a.ndim - 1,), (1 if k_tied else 0,)), ((), ())), preferred_element_type=jnp.float32)
  z = logits_of(x, w, tied)
  zt = logits_of(teacher_x, wt, teacher_tied)
  terms = jsd_terms(z, zt, beta, temperature)
  jsd = terms.sum(-1)
  logz = jax.nn.logsumexp(z, axis=-1)
  nll = logz - jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]  # reported even when alpha = 0
  values = (jsd * weights, nll * weights)
  if not grads:
    return values, None, None
  s = jax.nn.log_softmax(z / temperature, axis=-1)
  t = jax.nn.log_softmax(zt / temperature, axis=-1)
  p = jnp.exp(s)
  if beta == 0:
    dz = p - jnp.exp(t)
  elif beta == 1:
    dz = p * (s - t - jsd[..., None])
  else:
    g = (1 - beta) * (s - jnp.logaddexp(s + jnp.log1p(-beta), t + jnp.log(beta)))
    dz = p * (g - (p * g).sum(-1, keepdims=True))
  dz = dz * ((1 - alpha) / temperature)
  if alpha:
    dz = dz + alpha * (jnp.exp(z - logz[..., None]) - jax.nn.one_hot(targets, z.shape[-1], dtype=jnp.float32))
  gx, gw = _through_head((dz * weights[..., None]).astype(dt), x, w.astype(dt), tied, with_w_grad)
  return values, gx, gw


_DIVERGENCE_BUFFERS = 8  # vocab-sized float32 arrays alive in one chunk of `_divergence_chunk`


def _divergence_over_chunks(x, w, xt, wt, targets, weights, tied, teacher_tied, beta, temperature, alpha, grads,
                            with_w_grad):
  per_chunk = functools.partial(_divergence_chunk, wt=wt, teacher_tied=teacher_tied, beta=beta,
                                temperature=temperature, alpha=alpha)
  return _over_chunks(x, w, (xt, targets), weights, tied, grads, with_w_grad, per_chunk, _DIVERGENCE_BUFFERS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _fused_divergence(x, w, xt, wt, targets, weights, tied, teacher_tied, beta, temperature, alpha, with_w_grad):
  """-> (sum of (1 - alpha) jsd + alpha nll, (jsd, nll)): the loss and its two parts (metrics: their
  cotangents are not used, so differentiate the loss only)."""
  (jsd, nll), _, _ = _divergence_over_chunks(x, w, xt, wt, targets, weights, tied, teacher_tied, beta, temperature,
                                             alpha, False, False)
  jsd, nll = jsd.sum(), nll.sum()
  return (1 - alpha) * jsd + alpha * nll, (jsd, nll)


def _fused_divergence_fwd(x, w, xt, wt, targets, weights, tied, teacher_tied, beta, temperature, alpha, with_w_grad):
  (jsd, nll), gx, gw = _divergence_over_chunks(x, w, xt, wt, targets, weights, tied, teacher_tied, beta,
                                               temperature, alpha, True, with_w_grad)
  jsd, nll = jsd.sum(), nll.sum()
  return ((1 - alpha) * jsd + alpha * nll, (jsd, nll)), (gx, gw)


def _fused_divergence_bwd(tied, teacher_tied, beta, temperature, alpha, with_w_grad, res, g):
  gx, gw = res
  scale = lambda a: a * g[0].astype(a.dtype)
  return scale(gx), None if gw is None else scale(gw), None, None, None, None  # the teacher gets no gradient


_fused_divergence.defvjp(_fused_divergence_fwd, _fused_divergence_bwd)
