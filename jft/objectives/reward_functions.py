"""Reward functions for online RL (GRPO), and judges that score a policy without training it.

A reward function maps `(prompts, completions)` -> one float per completion.
A config names one by a spec string:

    module.path:function         any importable function fn(prompts, completions) -> floats
    path/to/file.py:function     a function in a file
    run:DIR                      a jft run: a reward model (objective `reward`) scores prompt + completion;
                                 a classifier (objective `classification`) gives P(its last label), e.g.
                                 P(positive) from `make demo`'s sentiment run
    vader                        the vaderSentiment lexicon's compound score (pip install vaderSentiment)

Every call is checked (`call`): an exception, a wrong count or a non-finite
value is one error naming the spec and the step.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Sequence

import jax
import numpy as np

from jft import data
from jft.core import files, progress
from jft.core.errors import JftError

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]

# Spec prefixes served by a layer above this one: "run" -> a trained run as a scorer (`jft.run.scorer`
# registers it when jft.run is imported, which every training run and command does).
SCHEMES: dict[str, Callable[[str], RewardFn]] = {}


class RewardError(JftError, RuntimeError):
  pass


@functools.cache
def load(spec: str) -> RewardFn:
  """The reward function a spec names (loaded once per process)."""
  if not spec:
    raise RewardError("no reward function configured (objective.hparams.reward, e.g. 'run:runs/reward' or "
                      "'mymodule:my_reward')")
  if spec == "vader":
    return vader
  scheme, _, rest = spec.partition(":")
  if scheme in SCHEMES:
    return SCHEMES[scheme](rest)
  target, _, name = spec.rpartition(":")
  if not target or not name:
    raise RewardError(f"reward {spec!r}: expected module:function, file.py:function, run:DIR or vader")
  if target.endswith(".py"):
    if not os.path.isfile(target):
      raise RewardError(f"reward {spec!r}: no file {target}")
    module = files.import_file(target, RewardError)
  else:
    try:
      module = importlib.import_module(target)
    except ImportError as e:
      raise RewardError(f"reward {spec!r}: cannot import {target} ({e})") from None
  if not callable(getattr(module, name, None)):
    raise RewardError(f"reward {spec!r}: {target} has no function {name!r}")
  return getattr(module, name)


def call(spec: str, prompts: Sequence[str], completions: Sequence[str], where: str = "") -> np.ndarray:
  """[N] float32 rewards, checked: an exception, a wrong count or NaN/Inf is a RewardError naming where."""
  fn = load(spec)
  try:
    values = fn(list(prompts), list(completions))
  except Exception as e:  # a user's function: anything it raises is reported with where it happened
    raise RewardError(f"{where}: reward {spec!r} raised {type(e).__name__}: {e}") from e
  values = np.asarray(values, np.float32).reshape(-1)
  if values.shape[0] != len(completions):
    raise RewardError(f"{where}: reward {spec!r} returned {values.shape[0]} values for {len(completions)} "
                      "completions")
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise RewardError(f"{where}: reward {spec!r} returned {values[bad[0]]} for completion {bad[0]} "
                      f"({completions[bad[0]][:60]!r})")
  return values


def vader(prompts, completions):
  """The vaderSentiment lexicon's compound score of prompt + completion, in [-1, 1]."""
  try:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
  except ImportError:
    raise RewardError("reward 'vader' needs the vaderSentiment package (pip install vaderSentiment)") from None
  analyzer = _vader(SentimentIntensityAnalyzer)
  return [analyzer.polarity_scores(p + c)["compound"] for p, c in zip(prompts, completions)]


@functools.cache
def _vader(cls):
  return cls()


@functools.partial(jax.jit, static_argnames=("model",))
def _last_logits(model, params, ids, mask):
  return model.apply({"params": params}, ids, attention_mask=mask, last_only=True)


def label_probability(model, params, tokenizer, prompts, label_ids, chat: bool, batch_size: int) -> np.ndarray:
  """P(last label | prompt) among the label words' first tokens (left padding: the answer is the last position)."""
  out = []
  for start in progress.track(range(0, len(prompts), batch_size), -(-len(prompts) // batch_size),
                              "scoring (batches)"):
    rows = [np.asarray(tokenizer(p, add_special_tokens=not chat)["input_ids"], np.int32)
            for p in prompts[start:start + batch_size]]
    length = -(-max(map(len, rows)) // 16) * 16
    batch = data.pad_batch([(x, x) for x in rows], length, tokenizer.pad_token_id or 0, left=True)
    logits = np.asarray(_last_logits(model, params, batch["input_ids"], batch["attention_mask"]), np.float64)
    logits = logits.reshape(len(rows), -1)[:, label_ids]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    out.append(p[:, -1] / p.sum(-1))
  return np.concatenate(out).astype(np.float32)
