"""Continuous batching over a fixed number of decode slots, many adapters over one base (no HTTP here).

    Engine(model, base, tokenizer, adapters)   one device state, one background thread that owns it
      submit(Request)                          -> queued; a free slot prefills it, then it decodes
                                                  with whatever else is running, adapter or not

The state: a KV cache row per slot (`jft.models.transformer.init_cache`, batch = slots), each slot's
key mask over the cache, the index its next token is written to, its adapter, sampling settings and
random key. A decode step `vmap`s the model over the slots: the frozen base is shared (`in_axes`
None) and each slot gathers its adapter's leaves from a stack (row 0: neutral leaves, the base
itself), as Punica's BGMV does, so requests for different adapters share every step. A new request
is prefilled alone at a bucketed length (multiples of 16: one compile per bucket), left-padded as
`jft.models.generate` does, written into its slot's row, and joins at the next step. A step reads and
writes only as much of the cache as the longest running request needs (128, 256, ... positions: one
compile per length, all at warm-up). A finished, cancelled or disconnected request frees its slot at once.

Methods that can share a batch: LoRA, DoRA (its column rescale precomputed per adapter: the norm of
`kernel + scale * a @ b` depends on the weights only) and IA3. Greedy output equals `generate`'s for
the same prompt token for token; a sampled request with a seed draws what `generate` draws with it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import itertools
import os
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft import peft  # noqa: F401 - registers the methods' hooks (IA3's default) with the model
from jft.core import rules
from jft.core.errors import JftError
from jft.models import generate as gen
from jft.models import hooks
from jft.models import load_pretrained, load_tokenizer
from jft.models.transformer import init_cache
from jft.peft.lora import dora_column
from jft.run import assemble
from jft.run.folder import base_identity, read_config

BATCHABLE = ("lora", "dora", "ia3")  # methods whose leaves stack into one batch (LoRA/DoRA and IA3 groups)
BUCKET = 16  # prompt lengths are padded up to a multiple of this: one prefill compile per bucket
DEFAULT_MAX_LEN = 2048  # cache positions per slot unless told (the model's context when shorter)


class EngineError(JftError, ValueError):
  """A request or an adapter the engine cannot serve (the message says what is allowed)."""


class QueueFull(EngineError):
  pass


class EngineStopped(EngineError):
  pass


@dataclasses.dataclass
class Result:
  text: str
  tokens: list  # generated ids, the stop token included when one ended it
  finish_reason: str  # "stop" | "length" | "cancelled"
  prompt_tokens: int


@dataclasses.dataclass(eq=False)
class Request:
  """One completion. `on_text(piece)` is called from the engine's thread with each new piece of text;
  `future` holds the Result (or the engine's failure)."""
  prompt: Sequence[int]
  model: str  # the base's name or an adapter's
  max_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  stop: Sequence[str] = ()
  seed: Optional[int] = None
  on_text: Optional[Callable[[str], None]] = None

  def __post_init__(self):
    self.future: concurrent.futures.Future = concurrent.futures.Future()
    self.tokens: list[int] = []
    self.sent = ""  # the text passed to on_text so far
    self.text: Optional[str] = None  # the whole text, once finished
    self.cancelled = threading.Event()

  def cancel(self):
    """Free the request's slot at the next step (a client that went away)."""
    self.cancelled.set()

  def result(self, timeout=None) -> Result:
    return self.future.result(timeout)


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A trained adapter: its method and its own leaves (flat paths -> arrays), from a run folder."""
  name: str
  method: object
  leaves: dict
  source: str = ""


class _ServedLoRA(hooks.Hook):
  """LoRA's hook for stacked adapters: `y + scale * x @ a @ b`, then DoRA's column rescale when present.

  DoRA's `magnitude / ||kernel + scale * a @ b||` depends on the weights alone, so it is computed once
  per adapter (`column`, ones for plain LoRA and the base) instead of at every step.
  """
  group = "lora"

  def linear_output(self, p, x, y, kernel, module):
    dt = module.dtype
    delta = jnp.dot(jnp.dot(x, p["a"].astype(dt)), p["b"].astype(dt)) * p["scale"].astype(dt)
    y = y + delta
    return p["column"].astype(dt) * y if "column" in p else y

  def __hash__(self):  # a jit key, as the methods' frozen dataclasses are
    return hash(type(self))

  def __eq__(self, other):
    return type(other) is type(self)


def adapter_leaves(method, params) -> dict:
  """The leaves `method` added to a run's params (flat paths), checked to be batchable."""
  if method.name not in BATCHABLE:
    raise EngineError(f"method {method.name!r} cannot share a batch with other adapters; servable methods: "
                      f"{', '.join(BATCHABLE)}")
  return {p: v for p, v in rules.flatten(params).items() if method.own(p) is not None}


def stack_adapters(base: dict, adapters: Sequence[Adapter]) -> dict:
  """Adapters -> one flat tree with a leading axis: row 0 the base (neutral leaves), row i+1 adapter i.

  LoRA modules are zero-padded to a common rank; an adapter that does not touch a module gets zeros
  there (LoRA: b = 0, DoRA's column = 1) or ones (IA3), which compute the base exactly.
  """
  flat_base = rules.flatten(base)
  by_path: dict[str, list] = {}
  for i, adapter in enumerate(adapters):
    for path, value in adapter.leaves.items():
      by_path.setdefault(path, [None] * len(adapters))[i] = value
  out = {}
  lora_modules = sorted({p[:-len("/lora/a")] for p in by_path if p.endswith("/lora/a")})
  for m in lora_modules:
    rows = {"a": [], "b": [], "scale": [], "column": []}
    rank = max(v.shape[-1] for v in by_path[m + "/lora/a"] if v is not None)
    ref = {k: next(v for v in by_path[f"{m}/lora/{k}"] if v is not None) for k in ("a", "b", "scale")}
    kernel = flat_base[m + "/kernel"]
    lead, d_out = ref["scale"].shape, ref["b"].shape[-1]
    any_dora = any(v is not None for v in by_path.get(m + "/lora/magnitude", ()))
    for i in range(len(adapters)):
      a, b, s = (by_path[f"{m}/lora/{k}"][i] for k in ("a", "b", "scale"))
      if a is None:
        a, b, s = (jnp.zeros_like(ref[k], jnp.float32) for k in ("a", "b", "scale"))
      pad = rank - a.shape[-1]
      rows["a"].append(jnp.pad(jnp.asarray(a, jnp.float32), [(0, 0)] * (a.ndim - 1) + [(0, pad)]))
      rows["b"].append(jnp.pad(jnp.asarray(b, jnp.float32), [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)]))
      rows["scale"].append(jnp.asarray(s, jnp.float32))
      magnitude = by_path.get(m + "/lora/magnitude", [None] * len(adapters))[i]
      rows["column"].append(jnp.ones((*lead, d_out), jnp.float32) if magnitude is None else
                            dora_column(kernel, a, b, jnp.asarray(s), magnitude))
    neutral = {"a": jnp.zeros_like(rows["a"][0]), "b": jnp.zeros_like(rows["b"][0]),
               "scale": jnp.zeros_like(rows["scale"][0]), "column": jnp.ones_like(rows["column"][0])}
    for k, values in rows.items():
      if k == "column" and not any_dora:
        continue
      out[f"{m}/lora/{k}"] = jnp.stack([neutral[k], *values])
  for path, values in by_path.items():
    if "/ia3/" not in path:
      continue
    ref = next(v for v in values if v is not None)
    ones = jnp.ones(ref.shape, jnp.float32)
    out[path] = jnp.stack([ones, *(ones if v is None else jnp.asarray(v, jnp.float32) for v in values)])
  return out


def _sample(logits, key, step, temperature, top_p, any_sampled, any_top_p):
  """One row: logits [V] -> token id, drawn as `jft.models.generate.sample_token` draws it for batch 1
  with the same key (`fold_in(PRNGKey(seed), step)`); greedy where temperature == 0. `any_sampled` and
  `any_top_p` (over the batch) skip the noise and the sort when no row needs them (under vmap a `cond`
  runs both branches when its predicate differs per row, hence batch-wide flags)."""
  greedy = gen.sample_token(logits[None], None, gen.Sampling())[0]

  def draw(x):
    x = x / jnp.where(temperature > 0, temperature, 1.0)

    def nucleus(x):
      sorted_x = jnp.sort(x)[::-1]
      probs = jax.nn.softmax(sorted_x)
      mass_before = jnp.cumsum(probs) - probs
      cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_x, jnp.inf))
      return jnp.where((top_p < 1.0) & (x < cutoff), -jnp.inf, x)

    x = jax.lax.cond(any_top_p, nucleus, lambda x: x, x)
    noise = jax.random.gumbel(jax.random.fold_in(key, step), (1, x.shape[-1]), x.dtype)[0]
    return gen.sample_token((x + noise)[None], None, gen.Sampling())[0]

  drawn = jax.lax.cond(any_sampled, draw, lambda x: greedy, logits)
  return jnp.where(temperature > 0, drawn, greedy)


class Engine:
  """The batching engine. `start()` warms up (compiles the decode step at each cache length and the
  first prefill bucket) and starts the thread that owns the device; `stop()` drains it.

  `max_len` is the context of one request, prompt and completion (default: the model's, at most
  2048); the KV cache holds `max_batch` such rows."""

  def __init__(self, model, base: dict, tokenizer, adapters: Sequence[Adapter] = (), *, base_name: str = "base",
               max_batch: int = 16, max_queue: int = 64, max_len: Optional[int] = None, log=None):
    if max_batch < 1:
      raise EngineError(f"max_batch (--max-batch) {max_batch}: must be >= 1")
    if max_queue < 0:
      raise EngineError(f"max_queue (--max-queue) {max_queue}: must be >= 0")
    names = [base_name] + [a.name for a in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise EngineError(f"model name {dupes[0]!r} is served twice (the base is {base_name!r}); name each adapter "
                        "differently")
    self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    self.model = model.clone(settings=dataclasses.replace(model.settings, methods=(_ServedLoRA(),)))
    # Everything on one device, off any mesh a run was restored on: inputs that carry a mesh give outputs
    # that carry it, and a state that alternates between the two kinds would compile each function twice.
    self.device = jax.local_devices()[0]
    self.base = jax.device_put(base, self.device)
    self.tokenizer = tokenizer  # for callers: prompts are encoded outside the engine
    # The engine thread decodes with its own copy: a Rust tokenizer shared by two threads can refuse a
    # call ("Already borrowed") while the other holds it.
    self._detokenizer = copy.deepcopy(tokenizer)
    self.names = names
    self.index = {n: i for i, n in enumerate(names)}
    self.stacked = jax.device_put(rules.unflatten(stack_adapters(base, adapters)), self.device)
    self.max_batch, self.max_queue = max_batch, max_queue
    context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LEN
    if max_len is not None and not 2 <= max_len <= context:
      raise EngineError(f"max_len (--max-len) {max_len}: must be in 2..{context}, the model's context")
    self.context = max_len or min(context, DEFAULT_MAX_LEN)
    # Room for the prompt's bucket padding: token positions stay below the context, cache indices may not.
    self.cache_len = -(-(self.context + BUCKET) // BUCKET) * BUCKET
    self.stop_ids = set(gen.stop_token_ids(model, tokenizer))
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # The cache lengths a decode step can attend over: doubling from 128, then the whole cache.
    self.decode_lengths = [n for n in (128 << k for k in range(32)) if n < self.cache_len] + [self.cache_len]
    self.traces = {"decode": collections.Counter(), "prefill": collections.Counter()}  # compiles, by length
    self._pending: collections.deque = collections.deque()
    self._slots: list[Optional[Request]] = [None] * max_batch
    self._pos = [0] * max_batch  # each slot's next cache index, as the device state has it
    self._cond = threading.Condition()
    self._stopping = False
    self._thread: Optional[threading.Thread] = None
    self._error: Optional[BaseException] = None
    self._seeds = itertools.count(int.from_bytes(os.urandom(4), "little"))
    options = gen._CPU_OPTIONS if jax.default_backend() == "cpu" else None  # the same numerics as `generate`
    self._decode = jax.jit(self._decode_fn, static_argnums=(3,), donate_argnums=(2,), compiler_options=options)
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(2,), compiler_options=options)
    self._state = self._initial_state()
    self.steps = 0  # decode steps run
    self.tokens_out = 0  # tokens generated
    self.peak_active = 0  # most requests one decode step has run
    self.cancelled = 0  # requests whose caller went away before they finished

  # -- the compiled functions --------------------------------------------------------------------

  def _initial_state(self):
    """Placed on the device explicitly (committed, as jit outputs are: else each function compiles twice)."""
    return jax.device_put(self._zeros(self.max_batch, self.cache_len), self.device)

  def _zeros(self, b, n):
    return {"cache": init_cache(self.model.config, b, n, self.model.dtype),
            "mask": jnp.zeros((b, n), jnp.int32), "pos": jnp.zeros((b,), jnp.int32),
            "step": jnp.zeros((b,), jnp.int32), "token": jnp.zeros((b,), jnp.int32),
            "active": jnp.zeros((b,), bool), "adapter": jnp.zeros((b,), jnp.int32),
            "key": jnp.zeros((b, 2), jnp.uint32), "temperature": jnp.zeros((b,), jnp.float32),
            "top_p": jnp.ones((b,), jnp.float32)}

  def _tree(self, base, leaves):
    return rules.unflatten({**rules.flatten(base), **rules.flatten(leaves)})

  def _decode_fn(self, base, stacked, state, length):
    """One token for every slot: the last sampled token goes into the cache, the next is sampled.

    Only the first `length` cache positions are read and written (static: one compile per length in
    `decode_lengths`); the engine picks the shortest that holds every running request. The model's
    layer scan copies the cache it is given at each step, so this is what keeps a step's cost in
    proportion to the longest running request instead of the whole context (SmolLM2-135M, 8 slots:
    106 ms per step over 144 positions, 265 ms over 528, on 2 CPU cores).
    """
    self.traces["decode"][length] += 1  # runs only while tracing
    rows = jnp.arange(self.max_batch)
    active = state["active"]
    pos = jnp.where(active, state["pos"], 0)  # an idle slot computes at index 0 of its own row, unseen
    mask = state["mask"][:, :length]
    mask = mask.at[rows, pos].set(jnp.where(active, 1, mask[rows, pos]))
    full = state["cache"]

    def one(adapter, token, index, mask_row, k, v):
      leaves = jax.tree.map(lambda x: x[adapter], stacked)
      logits, cache = self.model.apply({"params": self._tree(base, leaves)}, token[None, None],
                                       attention_mask=mask_row[None], cache={"k": k[:, None], "v": v[:, None]},
                                       cache_index=index, prepend_prompt=False)
      return logits[0, -1], cache["k"][:, 0], cache["v"][:, 0]

    logits, k, v = jax.vmap(one, in_axes=(0, 0, 0, 0, 1, 1), out_axes=(0, 1, 1))(
        state["adapter"], state["token"], pos, mask, full["k"][:, :, :length], full["v"][:, :, :length])
    sampling = active & (state["temperature"] > 0)
    token = jax.vmap(_sample, in_axes=(0, 0, 0, 0, 0, None, None))(
        logits, state["key"], state["step"], state["temperature"], state["top_p"], jnp.any(sampling),
        jnp.any(sampling & (state["top_p"] < 1)))
    token = jnp.where(active, token, state["token"])
    cache = {"k": jax.lax.dynamic_update_slice_in_dim(full["k"], k, 0, axis=2),
             "v": jax.lax.dynamic_update_slice_in_dim(full["v"], v, 0, axis=2)}
    return {**state, "cache": cache, "mask": jax.lax.dynamic_update_slice_in_dim(state["mask"], mask, 0, axis=1),
            "token": token, "pos": state["pos"] + active, "step": state["step"] + active}

  def _prefill_fn(self, base, stacked, state, slot, adapter, ids, prompt_mask, key, temperature, top_p):
    """Write one left-padded prompt into slot `slot`'s cache row and sample its first token. The prompt's
    keys are all it attends to, so its cache is as long as its bucket; the rest of the row is masked."""
    length = ids.shape[0]
    self.traces["prefill"][length] += 1  # runs only while tracing
    leaves = jax.tree.map(lambda x: x[adapter], stacked)
    cache = init_cache(self.model.config, 1, length, self.model.dtype)
    logits, cache = self.model.apply({"params": self._tree(base, leaves)}, ids[None],
                                     attention_mask=prompt_mask[None], cache=cache, cache_index=0, last_only=True)
    sampling = temperature > 0
    token = _sample(logits[0, -1], key, jnp.int32(0), temperature, top_p, sampling, sampling & (top_p < 1))
    put = lambda a, v: a.at[slot].set(v)
    key_mask = jnp.concatenate([prompt_mask, jnp.zeros((self.cache_len - length,), jnp.int32)])
    new = {"cache": {n: jax.lax.dynamic_update_slice(state["cache"][n], cache[n], (0, slot, 0, 0, 0))
                     for n in ("k", "v")},
           "mask": put(state["mask"], key_mask), "pos": put(state["pos"], length), "step": put(state["step"], 1),
           "token": put(state["token"], token), "active": put(state["active"], True),
           "adapter": put(state["adapter"], adapter), "key": put(state["key"], key),
           "temperature": put(state["temperature"], temperature), "top_p": put(state["top_p"], top_p)}
    return new, token

  # -- requests ----------------------------------------------------------------------------------

  def check(self, prompt_tokens: int, max_tokens: int):
    """Refuse what cannot fit, naming both lengths."""
    if prompt_tokens < 1:
      raise EngineError("the prompt is empty; send at least one token")
    if prompt_tokens >= self.context:
      raise EngineError(f"the prompt has {prompt_tokens} tokens; this server's context is {self.context} tokens "
                        "and leaves none for the completion: shorten the prompt")
    if prompt_tokens + max_tokens > self.context:
      raise EngineError(f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: together past this "
                        f"server's context of {self.context} tokens; ask for at most "
                        f"{self.context - prompt_tokens} tokens or shorten the prompt")

  def submit(self, request: Request) -> Request:
    if request.model not in self.index:
      raise EngineError(f"no model {request.model!r}; served: {', '.join(self.names)}")
    if request.max_tokens < 1:
      raise EngineError(f"max_tokens={request.max_tokens}: must be >= 1")
    if not request.temperature >= 0 or not 0 < request.top_p <= 1:
      raise EngineError(f"temperature={request.temperature}, top_p={request.top_p}: need temperature >= 0 "
                        "(0 = greedy) and top_p in (0, 1]")
    if request.seed is not None and not -(1 << 63) <= request.seed < (1 << 63):
      raise EngineError(f"seed={request.seed}: must fit in 64 bits")
    self.check(len(request.prompt), request.max_tokens)
    bad = [t for t in request.prompt if not 0 <= t < self.model.config.vocab_size]
    if bad:
      raise EngineError(f"token id {bad[0]} is outside the vocabulary (0..{self.model.config.vocab_size - 1})")
    if request.seed is None:
      request.seed = next(self._seeds) % (1 << 31)
    with self._cond:
      if self._error is not None:
        raise EngineStopped(f"the engine stopped after an error: {self._error}")
      if self._stopping:
        raise EngineStopped("the server is shutting down; no new requests")
      running = sum(r is not None for r in self._slots)
      if running + len(self._pending) >= self.max_batch + self.max_queue:
        raise QueueFull(f"the server is full: {running} requests decoding, {len(self._pending)} waiting "
                        f"(--max-batch {self.max_batch}, --max-queue {self.max_queue}); retry later")
      self._pending.append(request)
      self._cond.notify_all()
    return request

  def generate(self, prompt, model: str, max_tokens: int, **kwargs) -> Result:
    """Submit and wait (for scripts and tests)."""
    return self.submit(Request(list(prompt), model, max_tokens, **kwargs)).result()

  @property
  def error(self) -> Optional[BaseException]:
    """What stopped the engine's thread, if anything did (the device failed)."""
    return self._error

  @property
  def stats(self) -> dict:
    with self._cond:
      return {"active": sum(r is not None for r in self._slots), "waiting": len(self._pending),
              "slots": self.max_batch, "decode_steps": self.steps, "tokens": self.tokens_out,
              "peak_active": self.peak_active, "cancelled": self.cancelled}

  # -- the thread --------------------------------------------------------------------------------

  def warmup(self):
    """Compile the decode step at every cache length and the first prefill bucket, so that requests
    only compile the prefill of a prompt length not seen before (each logged with its time)."""
    state = self._initial_state()
    for length in self.decode_lengths:
      state = self._run_decode(state, length)
    self._run_prefill(state, 0, 0, [self.pad_id], 0, 0.0, 1.0)
    self._state = self._initial_state()

  def _compiles(self) -> str:
    return (f"compiles so far: decode {dict(sorted(self.traces['decode'].items()))} by cache length, prefill "
            f"{dict(sorted(self.traces['prefill'].items()))} by prompt bucket")

  def _run_decode(self, state, length):
    before, t0 = self.traces["decode"][length], time.time()
    state = self._decode(self.base, self.stacked, state, length)
    if self.traces["decode"][length] != before:
      jax.block_until_ready(state["token"])
      self.log(f"serve: compiled the decode step ({self.max_batch} slots x {length} cache positions) in "
               f"{time.time() - t0:.1f}s; {self._compiles()}")
    return state

  def _run_prefill(self, state, slot, adapter, prompt, seed, temperature, top_p):
    length = -(-len(prompt) // BUCKET) * BUCKET
    ids = np.full((length,), self.pad_id, np.int32)
    mask = np.zeros((length,), np.int32)
    ids[length - len(prompt):], mask[length - len(prompt):] = prompt, 1
    before, t0 = self.traces["prefill"][length], time.time()
    key = jax.random.PRNGKey(seed)
    state, token = self._prefill(self.base, self.stacked, state, np.int32(slot), np.int32(adapter), ids, mask, key,
                                 np.float32(temperature), np.float32(top_p))
    token = int(token)
    if self.traces["prefill"][length] != before:
      self.log(f"serve: compiled the prefill of {length}-token prompts in {time.time() - t0:.1f}s; "
               f"{self._compiles()}")
    self._pos[slot] = length
    return state, token

  def start(self, warmup: bool = True):
    """Warm up (unless told not to: the first requests then compile what they need) and start the thread."""
    if warmup:
      self.warmup()
    self._thread = threading.Thread(target=self._main, name="jft-serve-engine", daemon=True)
    self._thread.start()
    return self

  def stop(self, timeout: float = 30.0) -> bool:
    """Take no new requests, finish the running and waiting ones (cancel what is left after `timeout`
    seconds); True when everything finished."""
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is None:  # never started: what waits is cancelled
      with self._cond:
        waiting, self._pending = list(self._pending), collections.deque()
      for request in waiting:
        self._finish(request, "cancelled")
      return True
    self._thread.join(timeout)
    clean = not self._thread.is_alive()
    if not clean:
      with self._cond:
        for r in [*self._pending, *self._slots]:
          if r is not None:
            r.cancel()
      self._thread.join(10)
    return clean

  def _main(self):
    try:
      while self._iteration():
        pass
    except BaseException as e:  # the device failed: every waiting caller hears it, none hangs
      self._error = e
      self.log(f"serve: the engine stopped: {type(e).__name__}: {e}")
      with self._cond:
        for r in [*self._pending, *self._slots]:
          if r is not None and not r.future.done():
            r.future.set_exception(EngineStopped(f"the engine stopped: {e}"))
        self._pending.clear()
        self._slots = [None] * self.max_batch

  def _iteration(self) -> bool:
    with self._cond:
      while not self._pending and all(r is None for r in self._slots) and not self._stopping:
        self._cond.wait()
      if self._stopping and not self._pending and all(r is None for r in self._slots):
        return False
      for request in [r for r in self._pending if r.cancelled.is_set()]:
        self._pending.remove(request)
        self._finish(request, "cancelled")
      admitted = []
      while self._pending and None in self._slots:
        request = self._pending.popleft()
        slot = self._slots.index(None)
        self._slots[slot] = request
        admitted.append((slot, request))
    for slot, request in admitted:
      self._state, token = self._run_prefill(self._state, slot, self.index[request.model], request.prompt,
                                             request.seed, request.temperature, request.top_p)
      self._advance(slot, request, token)
    for slot, request in enumerate(self._slots):
      if request is not None and request.cancelled.is_set():
        self._free(slot, "cancelled")
    running = [slot for slot, r in enumerate(self._slots) if r is not None]
    if running:
      self.peak_active = max(self.peak_active, len(running))
      need = max(self._pos[slot] for slot in running) + 1
      self._state = self._run_decode(self._state, next(n for n in self.decode_lengths if n >= need))
      for slot in running:
        self._pos[slot] += 1
      tokens = np.asarray(self._state["token"])
      self.steps += 1
      for slot, request in enumerate(self._slots):
        if request is not None:
          self._advance(slot, request, int(tokens[slot]))
    return True

  def _advance(self, slot: int, request: Request, token: int):
    """Take one new token of the request in `slot`: pass on its text, free the slot when it is done."""
    request.tokens.append(token)
    self.tokens_out += 1
    if token in self.stop_ids:
      self._emit(request, self._text(request.tokens[:-1]), final=True)
      return self._free(slot, "stop")
    text = self._text(request.tokens)
    hit = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
    if hit >= 0:
      self._emit(request, text[:hit], final=True)
      self._free(slot, "stop")
    elif len(request.tokens) >= request.max_tokens:
      self._emit(request, text, final=True)
      self._free(slot, "length")
    else:
      self._emit(request, text, final=False)

  def _text(self, tokens) -> str:
    return self._detokenizer.decode(tokens, skip_special_tokens=True)

  def _emit(self, request: Request, text: str, final: bool):
    """Pass on what is new; until the end, hold back a split multi-byte character and a tail that may
    begin a stop string (a stop string is never streamed)."""
    if final:
      request.text = text
    else:
      text = text.rstrip("\ufffd")
      hold = max((k for s in request.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
      text = text[:len(text) - hold]
    if len(text) > len(request.sent) and text.startswith(request.sent):
      piece, request.sent = text[len(request.sent):], text
      if request.on_text is not None:
        self._call(request, request.on_text, piece)

  def _free(self, slot: int, reason: str):
    request = self._slots[slot]
    with self._cond:
      self._slots[slot] = None
      self._cond.notify_all()
    self._state["active"] = self._state["active"].at[slot].set(False)
    self._finish(request, reason)

  def _finish(self, request: Request, reason: str):
    self.cancelled += reason == "cancelled"
    text = request.sent if reason == "cancelled" or request.text is None else request.text
    result = Result(text, list(request.tokens), reason, len(request.prompt))
    if not request.future.done():
      request.future.set_result(result)

  def _call(self, request: Request, listener, value):
    """A listener that fails (its client's loop closed) is that request's problem, never the engine's."""
    try:
      listener(value)
    except Exception as e:  # noqa: BLE001 - any failure of a caller's callback
      request.cancel()
      self.log(f"serve: a request's listener failed ({type(e).__name__}: {e}); cancelling that request")


def restore_adapters(workdir: Optional[str] = None, model: Optional[str] = None,
                     adapters: Sequence[tuple[str, str]] = (), report=None):
  """-> (model, base params, tokenizer, base name, [Adapter]) over one base: `workdir`'s (its adapter named
  after the folder) or `model`'s, plus `adapters` [(name, run folder)], each from its best checkpoint.

  Every run is checked before any is restored: its method must be batchable and its base the same
  weights (content hash); after restoring, its base leaves must equal the first one's (which refuses
  another quantization, dtype, `--init-from` or a PiSSA residual)."""
  if (workdir is None) == (model is None):
    raise EngineError("serve one base: give either a model (--model) or a run folder (--workdir), not "
                      f"{'both' if workdir else 'neither'}")
  runs = ([(os.path.basename(os.path.normpath(workdir)), workdir)] if workdir else []) + list(adapters)
  for name, folder in runs:
    if not name or not name.strip() or "/" in name:
      raise EngineError(f"adapter name {name!r} (run {folder}): must be non-empty, without '/'")
  seen = [n for n, _ in runs]
  dupes = sorted({n for n in seen if seen.count(n) > 1})
  if dupes:
    raise EngineError(f"adapter name {dupes[0]!r} is given twice; name each run differently (--adapter NAME=RUN)")
  identities = {}

  def identity_of(name):
    if name not in identities:
      identities[name] = base_identity(name)
    return identities[name]

  base_name, first = (model, f"--model {model}") if model is not None else (None, None)
  for name, folder in runs:
    config = read_config(folder, report)
    if config.method.name not in BATCHABLE:
      raise EngineError(f"run {folder} ({name}) uses method {config.method.name!r}, which cannot share a batch; "
                        f"servable methods: {', '.join(BATCHABLE)}")
    if base_name is None:
      base_name, first = config.model.name, f"run {folder}"
    mine, theirs = identity_of(config.model.name), identity_of(base_name)
    if mine["sha256"] != theirs["sha256"]:
      raise EngineError(f"run {folder} ({name}) fine-tuned {config.model.name} (sha256 {mine['sha256'][:12]}...), "
                        f"but the served base is {base_name} (sha256 {theirs['sha256'][:12]}..., from {first}); "
                        "adapters must share one base")
  base = served_model = tokenizer = None
  if model is not None:
    served_model, base = load_pretrained(model)
    tokenizer = load_tokenizer(model)
  served = []
  for name, folder in runs:
    r = assemble.restore(folder, "best", report=report)
    params = r.params()
    leaves = adapter_leaves(r.method, params)
    run_base = rules.unflatten({p: v for p, v in rules.flatten(params).items() if p not in leaves})
    if base is None:
      served_model, base, tokenizer = r.model, run_base, r.tokenizer
    else:
      problem = _base_difference(base, run_base)
      if problem:
        raise EngineError(f"run {folder} ({name}) runs over another version of {base_name} than {first}: {problem}; "
                          "adapters must share one base (same weights, quantization, dtype and --init-from)")
    served.append(Adapter(name, r.method, leaves, folder))
    del r, params, run_base  # before the next run loads its base: at most two copies alive, not three
  return served_model, base, tokenizer, base_name, served


def load(workdir: Optional[str] = None, model: Optional[str] = None, adapters: Sequence[tuple[str, str]] = (),
         report=None, **engine_kwargs) -> Engine:
  """An engine (not started) over `restore_adapters(workdir, model, adapters)`."""
  served_model, base, tokenizer, base_name, served = restore_adapters(workdir, model, adapters, report)
  return Engine(served_model, base, tokenizer, served, base_name=base_name, log=report, **engine_kwargs)


def _base_difference(a: dict, b: dict) -> Optional[str]:
  """The first leaf where two base trees differ (path, then shape, dtype or values), or None."""
  fa, fb = rules.flatten(a), rules.flatten(b)
  if set(fa) != set(fb):
    extra = sorted(set(fa) ^ set(fb))
    return f"{extra[0]} is in one tree only ({len(extra)} such leaves)"
  for path in sorted(fa):
    la, lb = jax.tree.leaves(fa[path]), jax.tree.leaves(fb[path])
    if len(la) != len(lb):
      return f"{path} is quantized in one tree only"
    for x, y in zip(la, lb):
      if x.shape != y.shape or x.dtype != y.dtype:
        return f"{path} is {x.dtype}{list(x.shape)} in one and {y.dtype}{list(y.shape)} in the other"
      if not np.array_equal(np.asarray(x), np.asarray(y)):
        return f"{path} holds other values"
  return None
