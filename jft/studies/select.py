"""`jft data select`: keep the rows a model scores highest (layer 7: loads a base model or a run).

Scores, per row, from one batched forward pass per batch (right padding, the fused head's per-token
log-probabilities, `jft.models.head.model_logps`):

- `loss`: the mean negative log-likelihood of the response tokens given the prompt (with one text
  field: of all its tokens). Highest first: the rows the model finds hardest.
- `ifd`: the instruction-following difficulty of "From Quantity to Quality" (Li et al. 2023),
  loss(response | instruction) / loss(response alone), both means over the same response tokens.
  Highest first: rows whose instruction helps the model least. A value above 1 (the instruction
  makes the response less likely) is what the paper calls misaligned; it is reported, not removed.

Rows: the last `--field` is the response; the fields before it (non-empty ones, joined by a blank
line) the prompt. Token ids: [start] + prompt(text + "\\n") + response, and [start] + response alone,
with start = the tokenizer's bos token (else its eos token, as GPT-2 starts documents), so the first
response token is scored in both. Too long: the response is cut to `max_length - 1` tokens and the
prompt from the left to what is left. Kept: the top `kept_count(fraction, rows)` =
ceil(fraction * rows) rows, in their input order; ties go to the earlier row.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jft.core import progress
from jft.data import curate, text_of
from jft.models import head as heads
from jft.models import load_pretrained, load_tokenizer
from jft.run import assemble

SCORES = ("loss", "ifd")


def bucket(n: int) -> int:
  """A batch's padded length: the next of 16, 24, 32, 48, 64, 96... (at most 1.5x the longest row), so a pass
  over rows of any lengths compiles a few shapes (each compile of a real model takes seconds)."""
  size = 16
  while size < n:
    size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
  return size


def load(model=None, workdir=None, checkpoint: str = "best"):
  """-> (model, params, tokenizer, what): a base model (name, folder or .gguf) or a run's (method applied)."""
  if (model is None) == (workdir is None):
    raise curate.CurationError("select: give exactly one of --model NAME_OR_FOLDER or --workdir RUN")
  if workdir is not None:
    r = assemble.restore(str(workdir), checkpoint)
    return r.model, r.params(), r.tokenizer, f"run {workdir} ({r.source} checkpoint, step {r.step})"
  net, params = load_pretrained(str(model))
  return net, params, load_tokenizer(str(model)), f"model {model}"


def check_score(score: str, fields=None):
  if score not in SCORES:
    raise curate.CurationError(f"--score {score!r}: choose one of {', '.join(SCORES)}")
  if score == "ifd" and fields is not None and len(fields) < 2:
    raise curate.CurationError(f"--score ifd needs prompt and response fields (--field instruction,input,output: the "
                               f"last is the response); got only {fields[0]!r}")


@functools.partial(jax.jit, static_argnames=("model",))
def _logps(model, params, ids, mask, scored):
  """[B, T] log-probabilities of the tokens marked in `scored` (0 elsewhere), through the fused head."""
  return heads.model_logps(functools.partial(model.apply, {"params": params}), params, ids, mask, scored)


def sequences(tokenizer, prompt: str | None, response: str, max_length: int) -> tuple:
  """(ids, scored mask) of [start] + prompt + response (prompt None: the response alone); `scored` marks the
  response tokens."""
  start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
  head = [] if start is None else [start]
  resp = tokenizer(response, add_special_tokens=False)["input_ids"][:max(max_length - len(head), 1)]
  room = max_length - len(head) - len(resp)
  before = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"] if prompt is not None else []
  before = before[-room:] if room > 0 else []
  ids = head + before + resp
  scored = [0] * (len(head) + len(before)) + [1] * len(resp)
  if not head and scored:
    scored[0] = 0  # no start token: the first token has nothing to be predicted from
  return np.asarray(ids, np.int32), np.asarray(scored, np.int32)


def mean_losses(model, params, rows, batch_size: int, pad_id: int = 0, desc: str = "scoring rows",
                max_length: int | None = None) -> np.ndarray:
  """Per row of (ids, scored): the mean negative log-prob of its scored tokens (NaN when none), batched with
  right padding, rows of similar length together."""
  order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
  starts = range(0, len(order), batch_size)
  out = np.full(len(rows), np.nan)
  for s in progress.track(starts, len(starts), f"{desc} (batches of {batch_size})", enabled=True):
    chunk = order[s:s + batch_size]
    longest = max(len(rows[i][0]) for i in chunk)
    length = max(longest, min(bucket(longest), max_length or bucket(longest)))  # never past the model's positions
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    scored = np.zeros((batch_size, length), np.int32)
    for r, i in enumerate(chunk):
      x, m = rows[i]
      ids[r, :len(x)], mask[r, :len(x)], scored[r, :len(x)] = x, 1, m
    mask[len(chunk):, 0] = 1  # filler rows (one shape per length): one token attended, none scored
    logps = np.asarray(_logps(model, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(scored)))
    counts = scored.sum(axis=1)
    for r, i in enumerate(chunk):
      if counts[r]:
        out[i] = -float(logps[r].sum()) / counts[r]
  return out


def scores(model, params, tokenizer, table: curate.Table, score: str, *, batch_size: int = 16,
           max_length: int = 512) -> dict:
  """-> {"score": [per row], "loss": [...], "loss_alone": [...] (ifd)} for the rows of `table`."""
  check_score(score, table.fields)
  fields = table.fields
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  prompts, responses = [], []
  for i, row in enumerate(table.rows):
    values = [text_of(row, name, table.paths[table.origin[i][0]], table.origin[i][1]) for name in fields]
    responses.append(values[-1])
    prompts.append("\n\n".join(v for v in values[:-1] if v.strip()) if len(fields) > 1 else None)
  conditioned = [sequences(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
  loss = mean_losses(model, params, conditioned, batch_size, pad, "scoring rows", max_length)
  result = {"loss": loss}
  if score == "ifd":
    alone = mean_losses(model, params, [sequences(tokenizer, None, r, max_length) for r in responses], batch_size, pad,
                        "scoring responses alone", max_length)
    result["loss_alone"] = alone
    with np.errstate(divide="ignore", invalid="ignore"):
      result["score"] = np.where(alone > 0, loss / alone, np.nan)
  else:
    result["score"] = loss
  return result


def select(inputs, out: str, *, fraction: float, score: str = "loss", fields="text", model=None, workdir=None,
           checkpoint: str = "best", batch_size: int = 16, max_length: int = 512, overwrite: bool = False) -> dict:
  """Keep the top `fraction` of the rows of `inputs` by `score` (highest first; rows without a score last);
  write them to OUT in input order and OUT.report.json with every row's score. -> the report."""
  t0 = time.time()
  curate.check_fraction("--fraction", fraction)
  check_score(score)
  curate.check_positive("--batch-size", batch_size)
  if not isinstance(max_length, int) or max_length < 2:
    raise curate.CurationError(f"--max-length {max_length}: must be an integer >= 2")
  if (model is None) == (workdir is None):
    raise curate.CurationError("select: give exactly one of --model NAME_OR_FOLDER or --workdir RUN")
  table = curate.read_table(inputs, fields)
  check_score(score, table.fields)
  curate.check_outputs(out, table.paths, overwrite)
  net, params, tokenizer, what = load(model, workdir, checkpoint)
  max_length = min(max_length, net.config.max_position_embeddings)  # never past the model's positions
  result = scores(net, params, tokenizer, table, score, batch_size=batch_size, max_length=max_length)
  values = result["score"]
  n_keep = curate.kept_count(fraction, len(table.rows))
  rank = sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -values[i] if not math.isnan(values[i])
                                                  else 0.0, i))
  keep = rank[:n_keep]
  cutoff = min((values[i] for i in keep if not math.isnan(values[i])), default=None)
  as_list = lambda a: [None if math.isnan(v) else round(float(v), 6) for v in a]
  removed = [{**table.where(i), "reason": "no response tokens to score" if math.isnan(values[i])
              else f"{score} below the kept rows' lowest", "score": as_list([values[i]])[0]} for i in rank[n_keep:]]
  report = {"command": "select", "model": what, "settings": {"score": score, "fraction": fraction, "order": "highest "
            "first", "batch_size": batch_size, "max_length": max_length},
            "counts": {"kept": n_keep, "cutoff": None if cutoff is None else round(float(cutoff), 6)},
            "scores": as_list(values)}
  if score == "ifd":
    report["losses"] = {"conditioned": as_list(result["loss"]), "alone": as_list(result["loss_alone"])}
  return curate.finish(out, table, keep, removed, report, t0)
