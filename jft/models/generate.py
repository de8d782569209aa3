"""Jitted KV-cache decoding: greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded into one batch, prefilled in
one call that writes the cache, then decoded one token per step inside a
`lax.while_loop` that stops when every row has hit a stop token. The loop runs
in chunks of CHUNK tokens (one compiled function per model, batch, padded
length and settings, called again with the state it left), so long generations
show progress.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft.core import progress
from jft.core.errors import JftError
from jft.models import hooks
from jft.data.token_ids import TokenIdError, check_ids
from jft.models.transformer import Transformer, init_cache


class GenerationError(JftError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise GenerationError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
    if self.temperature < 0:
      raise GenerationError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise GenerationError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      raise GenerationError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")


def _argmax(x):
  """[B, V] -> [B] int32, the first index of each row's maximum.

  Two plain reductions (max, then the smallest index holding it): XLA:CPU runs
  jnp.argmax's paired value/index reduction 5-10x slower over a 49k vocabulary.
  """
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  first = jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), index, x.shape[-1]), axis=-1)
  return jnp.minimum(first, x.shape[-1] - 1)  # a row of NaN has no maximum


def sample_token(logits, rng, s: Sampling):
  """logits [B, V] float32 -> token ids [B]."""
  if s.temperature == 0:
    return _argmax(logits)
  logits = logits / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < s.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return _argmax(logits + jax.random.gumbel(rng, logits.shape, logits.dtype))  # = jax.random.categorical


def _prefill(model: Transformer, sampling: Sampling, params, ids, mask):
  """Write the prompt into a fresh cache -> the decoding state before the first new token."""
  b, p = ids.shape
  steps = sampling.max_new_tokens
  # Prompt-tuning vectors take the first cache slots; the prefill writes them with the prompt.
  n = hooks.input_prefix_length(params, model.settings)
  cache = init_cache(model.config, b, n + p + steps, model.dtype)
  key_mask = jnp.concatenate([jnp.ones((b, n), mask.dtype), mask, jnp.zeros((b, steps), mask.dtype)], axis=1)
  logits, cache = model.apply({"params": params}, ids, attention_mask=key_mask, cache=cache, cache_index=0,
                              last_only=True)
  out = jnp.full((b, steps), 0, jnp.int32)
  return jnp.int32(0), cache, key_mask, logits[:, -1], out, jnp.zeros((b,), bool)


def _continue(model: Transformer, sampling: Sampling, params, state, rng, stop_tokens, pad_id, until):
  """Decode from `state` until step `until`, the token budget, or every row has stopped."""
  steps = sampling.max_new_tokens
  p = state[2].shape[1] - steps  # cache slots before the first new token (prefix + padded prompt)

  def cond(s):
    step, _, _, _, _, done, _ = s
    return (step < jnp.minimum(until, steps)) & ~jnp.all(done)

  def body(s):
    step, cache, key_mask, last, out, done, rng = s
    # One key per step, folded from the run's seed: chunking the loop cannot change the samples.
    tok = jnp.where(done, pad_id, sample_token(last, jax.random.fold_in(rng, step), sampling))
    out = out.at[:, step].set(tok)
    done = done | jnp.isin(tok, stop_tokens)
    key_mask = key_mask.at[:, p + step].set(1)
    logits, cache = model.apply({"params": params}, tok[:, None], attention_mask=key_mask,
                                cache=cache, cache_index=p + step, prepend_prompt=False)
    return step + 1, cache, key_mask, logits[:, -1], out, done, rng

  *state, _ = jax.lax.while_loop(cond, body, (*state, rng))
  return tuple(state)


# On XLA:CPU the YNNPACK dot fusions run decoding's skinny products ([batch, d] x
# [d, d']) about 3x slower than the default emitter: the whole loop 25% slower
# at batch 16 (SmolLM2-135M, 2 cores). Training's large products are not
# affected, so the option is set for these functions alone.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# Tokens decoded per compiled call: between calls the progress bar moves and a
# batch whose rows have all stopped ends. The state stays on the device (donated).
CHUNK = 8


@functools.cache
def _decoder(backend: str):
  options = _CPU_OPTIONS if backend == "cpu" else None
  prefill = jax.jit(_prefill, static_argnames=("model", "sampling"), compiler_options=options)
  resume = jax.jit(_continue, static_argnames=("model", "sampling"), donate_argnames=("state",),
                   compiler_options=options)
  return prefill, resume


def _check_prompts(model: Transformer, prompts, max_new_tokens: int):
  """Token ids inside the vocabulary; prompt + new tokens inside the context (positions past it are garbage
  for learned position tables and untrained for RoPE)."""
  for i, prompt in enumerate(prompts):
    try:
      check_ids(prompt, model.config.vocab_size, where=f"prompt {i}")
    except TokenIdError as e:
      raise GenerationError(str(e)) from None
  context = getattr(model.config, "max_position_embeddings", None)
  longest = max(len(p) for p in prompts)
  if context and longest >= context:
    raise GenerationError(f"a prompt of {longest} tokens leaves no room for new tokens in the model's context of "
                          f"{context} positions; shorten the prompt")
  if context and longest + max_new_tokens > context:
    raise GenerationError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
                          f"of {context} positions; shorten the prompt or ask for at most "
                          f"{max(context - longest, 0)} new tokens")


def _bucket(n: int, multiple: int = 16) -> int:
  return -(-n // multiple) * multiple


def generate(model: Transformer, params, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
             *, stop_tokens: Sequence[int] = (), seed: int = 0, pad_id: int = 0,
             progress_desc: str | None = None) -> list[list[int]]:
  """Token-id prompts -> generated ids per prompt (stop token included, padding removed).

  `progress_desc` names a progress bar over the new tokens (process 0; silent for
  quick batches, see `jft.core.progress.track`); None shows none (e.g. inside a training step).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise GenerationError("generate needs at least one non-empty prompt")
  _check_prompts(model, prompts, sampling.max_new_tokens)
  length = _bucket(max(len(p) for p in prompts))
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):  # left padding: every row ends at the same index
    ids[row, length - len(prompt):] = prompt
    mask[row, length - len(prompt):] = 1
  stops = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
  prefill, resume = _decoder(jax.default_backend())
  state = prefill(model, sampling, params, jnp.asarray(ids), jnp.asarray(mask))
  rng, pad = jax.random.PRNGKey(seed), jnp.int32(pad_id)
  chunks = -(-sampling.max_new_tokens // CHUNK)
  for until in progress.track(range(CHUNK, chunks * CHUNK + 1, CHUNK), chunks, progress_desc or "",
                              enabled=False if progress_desc is None else None, per_item=CHUNK):
    state = resume(model, sampling, params, state, rng, stops, pad, jnp.int32(until))
    step, done = jax.device_get((state[0], state[5]))  # one transfer per chunk
    if done.all() or step >= sampling.max_new_tokens:
      break
  out = np.asarray(state[4])[:, :int(step)]
  results = []
  stop_set = set(stop_tokens)
  for row in out.tolist():
    cut = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
    results.append(row[:cut])
  return results


def stop_token_ids(model: Transformer, tokenizer) -> list[int]:
  ids = set(model.config.eos_token_id)
  if tokenizer is not None and tokenizer.eos_token_id is not None:
    ids.add(tokenizer.eos_token_id)
  return sorted(ids)


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = True) -> list[list[int]]:
  """Apply the tokenizer's chat template when it has one (and `chat`), then tokenize."""
  if chat and getattr(tokenizer, "chat_template", None):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  return [tokenizer(p)["input_ids"] for p in prompts]


def generate_text(model: Transformer, params, tokenizer, prompts: Sequence[str],
                  sampling: Sampling = Sampling(), *, chat: bool = True, seed: int = 0,
                  progress_desc: str | None = None) -> list[str]:
  ids = encode_prompts(tokenizer, prompts, chat)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  out = generate(model, params, ids, sampling, stop_tokens=stop_token_ids(model, tokenizer), seed=seed,
                 pad_id=pad, progress_desc=progress_desc)
  return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]
