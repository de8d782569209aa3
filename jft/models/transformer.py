"""The pre-norm decoder every supported family is an instance of.

Param tree (layers stacked on a leading axis by `nn.scan`, L = num_layers;
optional leaves in brackets):

    embed_tokens/embedding                 [vocab, d]
    [embed_positions/embedding]            [max_pos, d]         (GPT-2)
    layers/input_layernorm/scale           [L, d]   [+ bias]    (LayerNorm)
    layers/self_attn/{q,k,v}_proj/kernel   [L, d, heads*hd]     [+ bias]  (Qwen2, GPT-2)
    layers/self_attn/o_proj/kernel         [L, heads*hd, d]     [+ bias]  (GPT-2)
    layers/post_attention_layernorm/scale  [L, d]   [+ bias]
    layers/mlp/{gate,up}_proj/kernel       [L, d, ffn]          (gate only when gated)
    layers/mlp/down_proj/kernel            [L, ffn, d]
    norm/scale                             [d]      [+ bias]
    [lm_head/kernel]                       [d, vocab]           (untied)

Calling conventions
* `model.apply({"params": p}, ids, attention_mask=mask)` -> logits
  `[batch, seq, vocab]` (float32). `attention_mask` is 1 for real tokens and
  may pad on either side; positions count only real tokens. Values 1, 2, 3...
  mark packed examples: attention stays inside each, positions restart.
  `return_hidden=True` returns the final-norm output `[batch, seq, d]` instead.
* Token ids are not checked (they may be tracers): an id >= vocab_size (or
  < -vocab_size) embeds as NaN, and through attention the logits of its whole
  row come back NaN, without an error; an id in -vocab_size..-1 silently reads
  a row from the end of the embedding table. Check ids from outside (another
  tokenizer, a data file) with `jft.models.check_ids(ids, config.vocab_size)`
  before calling; generation and training do.
* With `cache=...` (see `init_cache`) the call decodes incrementally and
  returns `(logits, cache)`: `attention_mask` then covers the whole cache
  length and `cache_index` is where the new tokens are written.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.core.errors import JftError
from jft.models.config import ModelConfig
from jft.models import attention, hooks
from jft.models.attention import causal_blocks  # noqa: F401  (where jft.studies.estimate reads it)
from jft.models.layers import (ACTIVATIONS, Embed, Linear, Settings, apply_rope, constrain, make_norm, rope_cos_sin,
                               rope_inv_freq)

Dtype = Any

# Logical axis names of every base parameter, by path (full match, first wins).
# `jft.models.sharding` maps them to mesh axes; `layers` is the scanned layer axis.
PARAM_AXES = (
    (r"embed_tokens/embedding", ("vocab", "embed")),
    (r"embed_positions/embedding", (None, "embed")),
    (r"layers/self_attn/q_proj/kernel", ("layers", "embed", "heads")),
    (r"layers/self_attn/(k|v)_proj/kernel", ("layers", "embed", "kv_heads")),
    (r"layers/self_attn/q_proj/bias", ("layers", "heads")),
    (r"layers/self_attn/(k|v)_proj/bias", ("layers", "kv_heads")),
    (r"layers/self_attn/o_proj/kernel", ("layers", "heads", "embed")),
    (r"layers/(self_attn/o_proj|mlp/down_proj)/bias", ("layers", "embed")),
    (r"layers/mlp/(gate|up)_proj/kernel", ("layers", "embed", "mlp")),
    (r"layers/mlp/(gate|up)_proj/bias", ("layers", "mlp")),
    (r"layers/mlp/down_proj/kernel", ("layers", "mlp", "embed")),
    (r"layers/(input|post_attention)_layernorm/(scale|bias)", ("layers", "norm")),
    (r"norm/(scale|bias)", ("norm",)),
    (r"lm_head/kernel", ("embed", "vocab")),
)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # `dots`' matmul outputs (every `Linear` is one [tokens, in] x [in, out] dot) kept in pinned host
    # memory instead of device memory until the backward pass reads them back.
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(offload_src="device",
                                                                       offload_dst="pinned_host"),
}
# What a layer keeps for the backward pass unless told otherwise: the matmul outputs, with norms,
# rotary, softmax, activations and dequantization recomputed. Without remat autodiff keeps about
# twice as much (each norm's and activation's intermediates, some in two shapes), and writing those
# residuals costs more than recomputing them: on SmolLM2-135M at 8 x 128 the full fine-tuning step
# needs 1,489 instead of 2,821 MiB of temporaries and is 10% faster (LoRA and QLoRA on all linears:
# -31% memory, 4-11% faster; benchmarks/README.md). Forward-only calls are unaffected.
DEFAULT_REMAT = "dots"


class RematError(JftError, ValueError):
  """A remat policy this backend cannot run."""


def host_offload_supported(device=None) -> bool:
  """Whether `device` (default: the first) has pinned host memory to offload saved activations to."""
  device = device or jax.devices()[0]
  try:
    return "pinned_host" in {m.kind for m in device.addressable_memories()}
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    return False


def remat_policy(name: str):
  """The checkpoint policy of `model.remat=name`; `offload` only where the backend has pinned host memory."""
  if name not in REMAT_POLICIES:
    raise RematError(f"model.remat={name!r}; expected one of {', '.join(REMAT_POLICIES)}")
  if name == "offload" and not host_offload_supported():
    raise RematError(f"model.remat=offload needs pinned host memory, which the {jax.default_backend()} backend "
                     f"does not offer; use dots, dots_no_batch, full or none")
  return REMAT_POLICIES[name]


class Attention(nn.Module):
  config: ModelConfig
  dtype: Dtype
  param_dtype: Dtype
  settings: Settings = Settings()

  @nn.compact
  def __call__(self, x, mask, cos, sin, layer_cache, cache_index):
    c = self.config
    b, t, _ = x.shape
    dense = lambda n, f, bias: Linear(f, bias, self.dtype, self.param_dtype, settings=self.settings, name=n)
    q = dense("q_proj", c.num_heads * c.head_dim, c.qkv_bias)(x)
    k = dense("k_proj", c.num_kv_heads * c.head_dim, c.qkv_bias)(x)
    v = dense("v_proj", c.num_kv_heads * c.head_dim, c.qkv_bias)(x)
    q = constrain(q.reshape(b, t, c.num_heads, c.head_dim), self.settings, ("batch", "length", "act_heads", None))
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if cos is not None:
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    new_cache = None
    if layer_cache is not None:
      k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                                  cache_index, axis=1)
      v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                                  cache_index, axis=1)
      new_cache = {"k": k_all, "v": v_all}
      k, v = k_all.astype(self.dtype), v_all.astype(self.dtype)

    # Extra keys/values visible to every query (prefix tuning), stored without
    # rotary embedding (as peft's past_key_values are).
    methods = hooks.groups(self)
    prefix = next((kv for kv in (h.attention_prefix(p) for h, p in methods) if kv is not None), None)
    if prefix is not None:
      pk, pv = (a.astype(self.dtype) for a in prefix)
      n = pk.shape[0]
      pk = jnp.broadcast_to(pk.reshape(1, n, c.num_kv_heads, c.head_dim), (b, n, c.num_kv_heads, c.head_dim))
      pv = jnp.broadcast_to(pv.reshape(1, n, c.num_kv_heads, c.head_dim), (b, n, c.num_kv_heads, c.head_dim))
      k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
      mask = jnp.concatenate([jnp.ones((*mask.shape[:2], n), bool), mask], axis=2)

    q = q.reshape(b, t, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
    out = attention.attend(q, k, v, mask, self.dtype, implementation=self.settings.attention,
                           causal=layer_cache is None)
    out = dense("o_proj", c.hidden_size, c.o_bias)(out.reshape(b, t, c.num_heads * c.head_dim))
    for hook, p in methods:
      out = hook.sublayer_output(p, out, self)
    return out, new_cache


class MLP(nn.Module):
  config: ModelConfig
  dtype: Dtype
  param_dtype: Dtype
  settings: Settings = Settings()

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda n, f: Linear(f, c.mlp_bias, self.dtype, self.param_dtype, settings=self.settings, name=n)
    act = ACTIVATIONS[c.activation]
    up = dense("up_proj", c.intermediate_size)(x)
    h = act(dense("gate_proj", c.intermediate_size)(x)) * up if c.mlp == "gated" else act(up)
    h = constrain(h, self.settings, ("batch", "length", "act_mlp"))
    out = dense("down_proj", c.hidden_size)(h)
    for hook, p in hooks.groups(self):
      out = hook.sublayer_output(p, out, self)
    return out


class Block(nn.Module):
  """One layer; `nn.scan` stacks it, threading the residual stream as carry."""
  config: ModelConfig
  dtype: Dtype
  param_dtype: Dtype
  settings: Settings = Settings()

  @nn.compact
  def __call__(self, x, layer_cache, mask, cos, sin, cache_index):
    c = self.config
    x = constrain(x, self.settings, ("batch", "length", "act_embed"))
    h = make_norm(c, self.dtype, self.param_dtype, "input_layernorm")(x)
    h, new_cache = Attention(c, self.dtype, self.param_dtype, self.settings, name="self_attn")(
        h, mask, cos, sin, layer_cache, cache_index)
    x = x + h
    h = make_norm(c, self.dtype, self.param_dtype, "post_attention_layernorm")(x)
    h = MLP(c, self.dtype, self.param_dtype, self.settings, name="mlp")(h)
    x = x + h
    return constrain(x, self.settings, ("batch", "length", "act_embed")), new_cache


def attention_mask_4d(segments, q_index, window: Optional[int]):
  """Boolean [B, Tq, S]: causal in index space, same segment only, optional window.

  `segments` [B, S] is the attention mask generalised: 0 = padding, and tokens
  attend only to earlier tokens with the same nonzero value, so a plain 0/1
  mask is ordinary padding and 1, 2, 3... separates packed examples.
  `q_index` [Tq] is each query's index in the key sequence. Indices (not
  positions) decide causality and the window, as in transformers.
  """
  k_index = jnp.arange(segments.shape[1])
  allowed = k_index[None, :] <= q_index[:, None]
  if window is not None:
    allowed &= (q_index[:, None] - k_index[None, :]) < window
  seg_q = jnp.take(segments, q_index, axis=1)
  same = (seg_q[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)
  return allowed[None] & same


def segment_positions(segments):
  """Position of each token among the real tokens of its segment: [B, S] -> [B, S].

  Padding is skipped (left padding does not shift positions, and prompt-tuning
  vectors before left padding stay contiguous with the text); packed segments
  1, 2, ... each start at 0. Relies on segment ids never decreasing along a row.
  """
  real = segments != 0
  count = jnp.cumsum(real, axis=1) - 1  # real tokens up to here, minus one
  last_seg = jax.lax.cummax(jnp.where(real, segments, 0), axis=1)
  prev_seg = jnp.concatenate([jnp.zeros_like(last_seg[:, :1]), last_seg[:, :-1]], axis=1)
  starts = real & (segments != prev_seg)
  start_count = jax.lax.cummax(jnp.where(starts, count, 0), axis=1)
  return jnp.where(real, count - start_count, 0)


class Transformer(nn.Module):
  config: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = DEFAULT_REMAT  # a key of REMAT_POLICIES
  settings: Settings = Settings()  # static run settings (layers.Settings); methods add themselves

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=0,
               last_only: bool = False, prepend_prompt: bool = True, return_hidden: bool = False):
    c = self.config
    b, t = input_ids.shape
    if attention_mask is None:
      if cache is not None:
        raise ValueError("decoding with a cache needs attention_mask over the whole cache length")
      attention_mask = jnp.ones((b, t), jnp.int32)
    embed = Embed(c.vocab_size, c.hidden_size, self.dtype, self.param_dtype, name="embed_tokens")
    x = constrain(embed(input_ids), self.settings, ("batch", "length", "act_embed"))

    # Vectors prepended to the input (prompt tuning, P-tuning). They are ordinary
    # earlier tokens for masks and positions; their logits are dropped. With a
    # cache, the caller's mask already covers their slots, and decoding steps
    # after the prefill pass prepend_prompt=False.
    n_prompt = 0
    prompts = [h.input_prefix(p) for h, p in hooks.groups(self)] if prepend_prompt else []
    prompt = next((v for v in prompts if v is not None), None)
    if prompt is not None:
      prompt = prompt.astype(self.dtype)
      n_prompt = prompt.shape[0]
      x = jnp.concatenate([jnp.broadcast_to(prompt[None], (b, *prompt.shape)), x], axis=1)
      if cache is None:
        attention_mask = jnp.concatenate(
            [jnp.ones((b, n_prompt), attention_mask.dtype), attention_mask], axis=1)
      t += n_prompt

    cache_index = jnp.asarray(cache_index, jnp.int32)
    q_index = cache_index + jnp.arange(t)
    if positions is None:
      # Position of a token = real tokens before it in its segment (padding skipped);
      # prefix-tuning keys count as earlier tokens, as peft's cache makes them.
      counts = segment_positions(attention_mask.astype(jnp.int32)) + self._prefix_length()
      positions = jnp.take(counts, q_index, axis=1)
    mask = attention_mask_4d(attention_mask, q_index, c.sliding_window)

    cos = sin = None
    if c.position == "learned":
      x = x + Embed(c.max_position_embeddings, c.hidden_size, self.dtype, self.param_dtype,
                    name="embed_positions")(positions)
    else:
      cos, sin = rope_cos_sin(positions, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_dict))

    block = Block
    if self.remat != "none":
      block = nn.remat(Block, policy=remat_policy(self.remat), prevent_cse=False)
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                    length=c.num_layers)
    x, new_cache = stack(c, self.dtype, self.param_dtype, self.settings, name="layers")(
        x, cache, mask, cos, sin, cache_index)

    if last_only:  # classification/decoding need one position; skip the rest of the vocab matmul
      x = x[:, -1:]
      n_prompt = 0
    x = make_norm(c, self.dtype, self.param_dtype, "norm")(x)
    if return_hidden:  # the training loss applies the output projection itself (`jft.models.head.head_loss`)
      return x[:, n_prompt:]
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = Linear(c.vocab_size, False, self.dtype, self.param_dtype, name="lm_head")(x)
    logits = constrain(logits, self.settings, ("batch", "length", "act_vocab"))
    logits = logits[:, n_prompt:].astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)

  def _prefix_length(self) -> int:
    attn = self.variables.get("params", {}).get("layers", {}).get("self_attn", {})
    for key in sorted(attn):
      kv = self.settings.hook(key).attention_prefix(attn[key]) if hooks.registered(key) else None
      if kv is not None:
        return kv[0].shape[-2]
    return 0


def init_cache(config: ModelConfig, batch: int, length: int, dtype=jnp.float32):
  """Zero KV cache `{"k","v"}: [layers, batch, length, kv_heads, head_dim]`."""
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
