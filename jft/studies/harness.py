"""jft models in EleutherAI's lm-evaluation-harness (`lm_eval` 0.4, the `jft[eval]` extra).

Importing this module registers `JftLM` as the harness model `jft`:

    lm_eval.simple_evaluate(model="jft", model_args="workdir=RUN,checkpoint=best", tasks=[...],
                            task_manager=lm_eval.tasks.TaskManager(include_path=DIR))
    python -m jft.harness --model jft --model_args model=smollm2-135m --tasks jft_sentiment \
        --include_path jft/studies/harness_tasks

`model_args`: `workdir=RUN` (a run folder, restored with its method unmerged, or folded into the base
with `merge=true`; `checkpoint=best|latest`) or `model=NAME_OR_FOLDER` (`quantize=nf4|fp4|int4|int8`),
and `batch_size`, `max_length`, `max_gen_toks`, `dtype`, `add_bos_token`, `prefix_token_id`.

The three request types follow the harness's own Hugging Face model (`lm_eval.models.huggingface.HFLM`),
so the same task gives the same numbers: the context/continuation split and its tokenization come from
`TemplateLM`; a request scores `(context + continuation)[-(max_length + 1):]` and only the continuation's
tokens, through the fused head (`jft.models.head.head_logps`, no `[batch, length, vocab]` logits) on
left-padded batches; `is_greedy` projects only the continuation's positions; rolling log-likelihoods use
the harness's own windows; `generate_until` decodes with the KV cache (`jft.models.generate`), then cuts
at the first stop sequence as HFLM does. `evaluate` (what `jft eval --harness` runs) checks the task
names, the include path and the run folder first, each with one named error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jft import quant
from jft.core import files, progress
from jft.core.errors import JftError
from jft.models import generate as gen
from jft.models import head as heads
from jft.models import load_pretrained, load_tokenizer
from jft.run import assemble
from jft.run.folder import read_config
from jft.studies import harness_tasks


class HarnessError(JftError, ValueError):
  """A harness request jft refuses: an unknown task or model argument, a missing path, a folder that is no run."""


try:
  import lm_eval
  import lm_eval.tasks
  from lm_eval import utils as lm_utils
  from lm_eval.__main__ import cli_evaluate
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import model_registry
  from lm_eval.models import utils as lm_model_utils
except ImportError as e:  # the optional extra
  raise HarnessError(f"the lm-evaluation-harness is not installed ({e.name}); pip install 'jft[eval]'") from e

# The local tasks (jft_sentiment, jft_alpaca_heldout, jft_chat): YAML files read by lm_eval's TaskManager.
# (From the package, not __file__: `python -m jft.harness` runs this code without a __file__.)
TASKS_DIR = os.path.dirname(os.path.abspath(harness_tasks.__file__))

# model_args keys -> what they are (the error for an unknown key lists them).
MODEL_ARGS = {
    "workdir": "a jft run folder", "checkpoint": "best|latest (with workdir)", "merge": "fold the method into the base",
    "model": "HF folder, .gguf file or embedded model name", "quantize": "nf4|fp4|int4|int8 (with model)",
    "dtype": "float32|bfloat16", "batch_size": "rows per forward pass", "max_length": "context in tokens",
    "max_gen_toks": "default new tokens of generate_until", "add_bos_token": "true|false",
    "prefix_token_id": "token that conditions an empty context",
}
# What simple_evaluate and lm_eval's command line pass beside model_args: accepted, not used (jft batches
# by batch_size and runs on JAX's default devices).
HARNESS_ARGS = ("max_batch_size", "device")
QUANT_FORMATS = ("nf4", "fp4", "int4", "int8")
DEFAULT_BATCH = 8
LENGTH_BUCKET = 16  # the shortest padded input length


def _bucket(n: int, least: int = LENGTH_BUCKET) -> int:
  """Padded lengths: powers of two from `least` up to 512, then multiples of 256 (few compiled shapes)."""
  if n > 512:
    return -(-n // 256) * 256
  size = least
  while size < n:
    size *= 2
  return size


def _positive_int(name: str, value, default=None, least: int = 1) -> int:
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < least:
    raise HarnessError(f"model_args {name}={value!r}: must be an integer >= {least}")
  return int(value)


def _flag(name: str, value) -> bool:
  if isinstance(value, bool):
    return value
  if str(value).lower() in ("true", "1", "false", "0"):
    return str(value).lower() in ("true", "1")
  raise HarnessError(f"model_args {name}={value!r}: must be true or false")


def load(workdir=None, checkpoint="best", merge=False, model=None, quantize=None, dtype=None):
  """-> (model, params, tokenizer) for the harness: a run folder's (method unmerged or merged) or a base model's."""
  if (workdir is None) == (model is None):
    raise HarnessError("model_args: give exactly one of workdir=RUN (a jft run folder) or model=NAME_OR_FOLDER")
  if workdir is not None:
    if quantize is not None:
      raise HarnessError("model_args quantize= applies to model=; a run folder is quantized as its config says")
    if checkpoint not in ("best", "latest"):
      raise HarnessError(f"model_args checkpoint={checkpoint!r}: must be best or latest")
    if not files.is_run_folder(str(workdir)):
      raise HarnessError(f"model_args workdir={workdir}: not a jft run folder (no config.json beside checkpoints "
                         "or metrics.jsonl)")
    r = assemble.restore(str(workdir), checkpoint)
    if not merge:
      return r.model, r.params(), r.tokenizer
    merged, _ = r.method.merge(r.tree())
    plain = r.model.clone(settings=dataclasses.replace(r.model.settings, methods=()))
    dense = jax.tree.map(lambda v: jnp.asarray(quant.as_dense(v), plain.param_dtype), merged,
                         is_leaf=quant.is_quantized)
    return plain, dense, r.tokenizer
  if merge:
    raise HarnessError("model_args merge=true applies to workdir= (a run's method); model= has nothing to merge")
  if quantize is not None and quantize not in QUANT_FORMATS:
    raise HarnessError(f"model_args quantize={quantize!r}: must be one of {', '.join(QUANT_FORMATS)}")
  dtype = dtype or "float32"
  if dtype not in ("float32", "bfloat16"):
    raise HarnessError(f"model_args dtype={dtype!r}: must be float32 or bfloat16")
  net, params = load_pretrained(str(model), dtype=jnp.dtype(dtype))
  if quantize:
    params, _ = quant.quantize(params, quant.rules_for(quantize), verbose=False)
  return net, params, load_tokenizer(str(model))


@functools.partial(jax.jit, static_argnames=("model", "greedy_len"))
def _score(model, params, ids, mask, completion, greedy_len: int):
  """Rows of `ids` [B, W+1] (left-padded; the continuation ends each row) -> (sum of the continuation's
  log-probs [B], is every continuation token but the last the argmax [B], the log-probs of the last token's
  position [B, V]). The model reads ids[:, :-1]; the log-probs go through the fused head, and only the last
  `greedy_len` positions are projected to the vocabulary (for `is_greedy`)."""
  inp, inp_mask = ids[:, :-1], mask[:, :-1]
  head = heads.output_head(params)
  if head is None:  # a method or quantization changes the output layer: from the logits
    logits = model.apply({"params": params}, inp, attention_mask=inp_mask)
    pad = jnp.zeros_like(logits[:, :1])
    logps = heads.logps_of_logits(jnp.concatenate([logits, pad], axis=1), ids, completion)
    tail = logits[:, -greedy_len:]
  else:
    hidden = model.apply({"params": params}, inp, attention_mask=inp_mask, return_hidden=True)
    # head_logps scores token t from position t - 1: one position more than the model read, never scored
    extended = jnp.concatenate([hidden, jnp.zeros_like(hidden[:, :1])], axis=1)
    logps = heads.head_logps(extended, params, head, ids, completion)
    tail = heads.project(hidden[:, -greedy_len:], params, head)
  greedy = jnp.argmax(tail[:, :-1], axis=-1) == ids[:, -greedy_len:-1]
  before_last = jnp.all(greedy | (completion[:, -greedy_len:-1] == 0), axis=1)
  return logps.sum(axis=1), before_last, jax.nn.log_softmax(tail[:, -1].astype(jnp.float32), axis=-1)


class JftLM(TemplateLM):
  """A jft model (a run folder or a base) as a harness `LM`; see the module docstring."""

  def __init__(self, workdir=None, checkpoint="best", merge=False, model=None, quantize=None, dtype=None,
               batch_size=None, max_length=None, max_gen_toks=256, add_bos_token=None, prefix_token_id=None,
               **unknown):
    super().__init__()
    bad = sorted(k for k in unknown if k not in HARNESS_ARGS)
    if bad:
      raise HarnessError(f"model_args: unknown key(s) {', '.join(bad)}; allowed: "
                         + ", ".join(f"{k} ({v})" for k, v in MODEL_ARGS.items()))
    self._batch = _positive_int("batch_size", None if batch_size in (None, "") else batch_size, DEFAULT_BATCH)
    self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
    self.add_bos_token = None if add_bos_token is None else _flag("add_bos_token", add_bos_token)
    self.custom_prefix_token_id = None if prefix_token_id is None else _positive_int(
        "prefix_token_id", prefix_token_id, least=0)
    self.model, self.params, self.tokenizer = load(workdir, checkpoint, _flag("merge", merge), model, quantize,
                                                   dtype)
    self._max_length = _positive_int("max_length", max_length) or lm_model_utils.resolve_max_length(
        self.model.config, self.tokenizer, default=2048)
    self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
    self.source = str(workdir if workdir is not None else model)

  # -- what the harness reads
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name_or_path", self.source)).replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
    special = lm_model_utils._add_special_kwargs(add_special_tokens, self.add_bos_token)
    prefix = self.tokenizer.decode(self.prefix_token_id)
    if add_special_tokens is None and lm_model_utils.has_bos_prefix(string, prefix):  # the string brings its BOS
      special["add_special_tokens"] = False
    ids = self.tokenizer.encode(string, **special)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                              continue_final_message=not add_generation_prompt)

  # -- scoring
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, greedy: bool = True):
    """[(cache key or None, context ids, continuation ids)] -> [(log-likelihood, is_greedy)], in order.

    Requests whose model input is the same (the choices of a multiple-choice question that differ only in
    their last token) share one row, as HFLM's logits cache does: each reads its last token's log-prob
    from the row's last position."""
    rows, members = {}, {}
    for index, (_, context, continuation) in enumerate(requests):
      if not context or not continuation or len(continuation) > self.max_length:
        raise HarnessError(f"a request of {len(context)} context and {len(continuation)} continuation tokens: "
                           f"both must be non-empty and the continuation at most max_length={self.max_length}")
      tokens = (context + continuation)[-(self.max_length + 1):]
      key = (tuple(tokens[:-1]), len(continuation))
      rows.setdefault(key, tokens)
      members.setdefault(key, []).append(index)
    keys = sorted(rows, key=lambda k: -len(k[0]))
    out = [None] * len(requests)
    starts = range(0, len(keys), self.batch_size)
    for start in progress.track(starts, len(starts), "harness log-likelihoods (batches)",
                                enabled=False if disable_tqdm else None):
      chunk = keys[start:start + self.batch_size]
      width = _bucket(max(len(rows[k]) for k in chunk) - 1) + 1
      # every batch has batch_size rows (a short last one is padded): one compiled shape per width
      ids = np.full((self.batch_size, width), self.pad_id, np.int32)
      mask = np.zeros((self.batch_size, width), np.int32)
      completion = np.zeros((self.batch_size, width), np.int32)
      for row, k in enumerate(chunk):
        tokens = rows[k]
        ids[row, width - len(tokens):] = tokens
        mask[row, width - len(tokens):] = 1
        completion[row, width - k[1]:] = 1
      longest = max(k[1] for k in chunk)
      greedy_len = min(_bucket(longest, 4), width - 1) if greedy else 1
      sums, before_last, last = jax.device_get(_score(self.model, self.params, jnp.asarray(ids), jnp.asarray(mask),
                                                      jnp.asarray(completion), greedy_len))
      for row, k in enumerate(chunk):
        shared = float(sums[row]) - float(last[row, rows[k][-1]])  # all but the row's own last token
        best = int(np.argmax(last[row]))
        for index in members[k]:
          token = requests[index][2][-1]
          out[index] = (shared + float(last[row, token]), greedy and bool(before_last[row]) and best == token)
    for (request, _, _), answer in zip(requests, out):
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each string's log-likelihood over the harness's disjoint windows of max_length tokens (as HFLM)."""
    windows, owner = [], []
    for index, (string,) in enumerate(req.args for req in requests):
      for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((None, context, continuation))
        owner.append(index)
    scores = self._loglikelihood_tokens(windows, disable_tqdm, greedy=False) if windows else []
    totals = [0.0] * len(requests)
    for index, (ll, _) in zip(owner, scores):
      totals[index] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, with do_sample) KV-cache decoding of up to max_gen_toks tokens, cut at the first
    stop sequence (the task's `until` and the end-of-text string), context left-truncated to leave room."""
    out = [None] * len(requests)
    groups = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
    stops = gen.stop_token_ids(self.model, self.tokenizer)
    for members in groups.values():
      kwargs = lm_model_utils.normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
      until = lm_model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      new = int(kwargs.pop("max_gen_toks"))
      room = self.max_length - new
      if room < 1:
        raise HarnessError(f"max_gen_toks={new} leaves no room for a context in max_length={self.max_length}")
      sampling = gen.Sampling(max_new_tokens=new, temperature=float(kwargs.get("temperature") or 0.0)
                              if kwargs.get("do_sample") else 0.0, top_k=int(kwargs.get("top_k") or 0),
                              top_p=float(kwargs.get("top_p") or 1.0) if kwargs.get("do_sample") else 1.0)
      prompts = {i: self._context_ids(requests[i].args[0], room) for i in members}
      ordered = sorted(members, key=lambda i: -len(prompts[i]))
      for start in range(0, len(ordered), self.batch_size):
        chunk = ordered[start:start + self.batch_size]
        batch = [prompts[i] for i in chunk]
        batch += [batch[-1]] * (self.batch_size - len(chunk))  # a short last batch: repeats, dropped below
        tokens = gen.generate(self.model, self.params, batch, sampling, stop_tokens=stops, pad_id=self.pad_id,
                              seed=int(kwargs.get("seed") or 0),
                              progress_desc=None if disable_tqdm else "harness generate_until (tokens)")
        for i, t in zip(chunk, tokens):
          text = lm_model_utils.postprocess_generated_text(self.tok_decode(t), until, None)
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def _context_ids(self, context: str, room: int) -> list[int]:
    """A context's ids as HFLM's batch encoding makes them (no special tokens added to a string that starts
    with BOS), left-truncated to `room`; an empty one is conditioned on the prefix token."""
    special = {}
    if lm_model_utils.has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
      special = {"add_special_tokens": False}
    elif self.add_bos_token is not None:
      special = {"add_special_tokens": self.add_bos_token}
    ids = self.tokenizer(context, **special)["input_ids"][-room:]
    return ids or [self.prefix_token_id]

  def get_model_info(self) -> dict:
    return {"jft_source": self.source, "jft_max_length": self.max_length}


def _register():
  """Register `JftLM` as `jft` once (`python -m jft.harness` runs this file as __main__ and imports it as well)."""
  if model_registry.get("jft", None) is None:
    model_registry.register("jft")(JftLM)


_register()


def task_manager(include_path=None, tasks=()):
  """A TaskManager over jft's local tasks and `include_path`; lm_eval's own tasks are indexed (seconds) only
  when a requested name is not among them. An unknown task or a missing path: one HarnessError."""
  paths = [TASKS_DIR]
  for path in ([] if include_path is None else [include_path] if isinstance(include_path, str) else include_path):
    if not os.path.isdir(path):
      raise HarnessError(f"--include-path {path}: no such folder (it holds task YAML files)")
    paths.append(path)
  manager = lm_eval.tasks.TaskManager(include_path=paths, include_defaults=False)
  if all(t in manager.all_tasks or t.endswith((".yaml", ".yml")) for t in tasks):
    return manager
  local = manager.all_tasks
  manager = lm_eval.tasks.TaskManager(include_path=paths)
  unknown = [t for t in tasks if t not in manager.all_tasks and not t.endswith((".yaml", ".yml"))]
  if unknown:
    raise HarnessError(f"unknown harness task(s) {', '.join(unknown)}; local tasks: {', '.join(local)} (and "
                       f"{len(manager.all_tasks) - len(local)} of lm_eval's own; `lm_eval ls tasks` lists them)")
  return manager


def evaluate(tasks, *, workdir=None, model=None, checkpoint="best", include_path=None, limit=None, batch_size=None,
             merge=False, log_samples=False, **model_args) -> dict:
  """simple_evaluate with model="jft", every input checked first; -> the harness's results dict."""
  tasks = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
  if not tasks:
    raise HarnessError("no harness task named; give a comma-separated list, e.g. jft_sentiment,jft_chat")
  if limit is not None and (isinstance(limit, bool) or limit <= 0):
    raise HarnessError(f"limit={limit}: must be a positive number of documents (or None for all)")
  manager = task_manager(include_path, tasks)
  args = {k: v for k, v in dict(workdir=workdir, model=model, batch_size=batch_size, merge=merge, **model_args).items()
          if v is not None}
  if workdir is not None:
    args["checkpoint"] = checkpoint
  lm = JftLM(**args)
  out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples)
  out["config"].update(model="jft", model_args=args)  # as if named by model_args (the instance was checked first)
  return out


def evaluate_run(workdir: str, tasks, *, include_path=None, limit=None, checkpoint="best", merge=False) -> tuple:
  """`jft eval --harness`: the run's harness results, written to RUN/harness/results.json -> (results, path)."""
  if not files.is_run_folder(workdir):
    raise HarnessError(f"--workdir {workdir}: not a jft run folder (no config.json beside checkpoints or metrics)")
  batch = read_config(workdir).eval.batch_size
  results = evaluate(tasks, workdir=workdir, checkpoint=checkpoint, include_path=include_path, limit=limit,
                     batch_size=batch, merge=merge)
  path = os.path.join(workdir, "harness", "results.json")
  kept = {k: v for k, v in results.items() if k != "samples"}
  files.write_json(path, json.loads(json.dumps(kept, default=lm_utils.handle_non_serializable)))
  return results, path


def main(argv=None) -> None:
  """`python -m jft.harness ARGS`: lm_eval's own command line, with the `jft` model registered."""
  # Run through jft's short name, the module has no file of its own: runpy leaves sys.argv[0] None,
  # which JAX's compilation-cache key cannot read.
  program = sys.argv[0] if sys.argv and sys.argv[0] else "python -m jft.harness"
  sys.argv = [program, *(sys.argv[1:] if argv is None else argv)]
  cli_evaluate()


if __name__ == "__main__":
  main()
