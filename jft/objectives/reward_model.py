"""Reward models: the LM with a scalar head on its last real token, trained on pairs (Bradley-Terry).

    loss = -log sigmoid(r(chosen) - r(rejected) - margin)          (TRL's RewardTrainer)

The head (`jft.peft.score_head`) trains beside the configured method and is
saved and exported with it (PEFT: `modules_to_save=["score"]`). Pairs come
from human ratings (`source="ratings"`: two Rotten Tomatoes snippets of one
split of data/sentiment, chosen = the higher mean human rating, margin =
`margin_scale` x the rating difference) or from a preference file
(`source="preferences"`: prompt + chosen against prompt + rejected).
Evaluation reports pairwise accuracy overall and by rating-difference bucket,
and the Spearman correlation of rewards with the human ratings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import numpy as np

from jft.objectives import losses
from jft import data, peft
from jft.data import preference as pd
from jft.core import progress
from jft.core.fields import Choice, Float, Int
from jft.objectives import api
from jft.peft.score_head import scores

SOURCES = ("ratings", "preferences")


@functools.partial(jax.jit, static_argnames=("model",))
def _rewards(model, params, input_ids, attention_mask):
  hidden = model.apply({"params": params}, input_ids, attention_mask=attention_mask, return_hidden=True)
  return scores(hidden, attention_mask, params["score"]["kernel"])[:, 0]


def rewards(model, params, tokenizer, texts, batch_size: int = 32, max_length: int = 512) -> np.ndarray:
  """[N] rewards of rendered texts (the reward model's own prompt format), in batches of right-padded rows."""
  out = []
  for start in progress.track(range(0, len(texts), batch_size), -(-len(texts) // batch_size), "rewards (batches)"):
    rows = [_ids(tokenizer, t, max_length) for t in texts[start:start + batch_size]]
    length = -(-max(map(len, rows)) // 16) * 16
    batch = data.pad_batch([(r, r) for r in rows], length, tokenizer.pad_token_id or 0)
    out.append(np.asarray(_rewards(model, params, batch["input_ids"], batch["attention_mask"])))
  return np.concatenate(out) if out else np.zeros(0, np.float32)


def _ids(tokenizer, text: str, max_length: int) -> np.ndarray:
  """Tokens of a rendered text, the end kept when too long (the reward is read at the last token)."""
  return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:], np.int32)


@dataclasses.dataclass(frozen=True)
class Reward(api.Objective):
  name: ClassVar[str] = "reward"
  source: str = "ratings"
  train_pairs: int = 4000  # ratings: pairs drawn from the train split (max_train_examples overrides)
  eval_pairs: int = 500  # ratings: pairs drawn from each evaluation split (max_eval/test_examples override)
  margin_scale: float = 0.0  # margin = margin_scale * rating difference; 0 = TRL's loss without a margin
  min_diff: float = 0.0  # ratings: skip pairs whose ratings differ by less
  center_rewards: float = 0.0  # TRL's center_rewards_coefficient (0 = off)
  hparam_rules: ClassVar[dict] = {"source": Choice(lambda: SOURCES), "train_pairs": Int(1), "eval_pairs": Int(1),
                                  "margin_scale": Float(0), "min_diff": Float(0), "center_rewards": Float(0)}

  def method(self, method):
    return peft.Compose((method, peft.ScoreHead()))

  def examples(self, d, tokenizer, split, limit):
    rows = pd.split_of(d.path, split, train_split=d.train_split, holdout=d.holdout, seed=0)
    render = lambda text: data.render_prompt(tokenizer, text, d.template, d.chat, d.system)
    if self.source == "preferences":
      pairs = pd.preference_examples(rows[:limit], tokenizer, chat=d.chat, template=d.template, system=d.system,
                                     where=f"{d.path} ({split})")
      return [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"], "margin": 0.0}
              for p in pairs]
    n = limit or (self.train_pairs if split == d.train_split else self.eval_pairs)
    pairs = pd.reward_pairs(rows, n_pairs=n, seed=0, min_diff=self.min_diff)
    return [{**p, "chosen": render(p["chosen"]), "rejected": render(p["rejected"]),
             "margin": self.margin_scale * p["margin"]} for p in pairs]

  def rows(self, examples, tokenizer, d):
    return [(_ids(tokenizer, ex["chosen"], d.max_length), _ids(tokenizer, ex["rejected"], d.max_length),
             np.float32(ex["margin"])) for ex in examples]

  def row_length(self, row):
    return max(len(row[0]), len(row[1]))

  def collate(self, rows, length, pad_id):
    flat = data.pad_batch([(x, x) for row in rows for x in row[:2]], length, pad_id)
    out = {k: flat[k].reshape(len(rows), 2, length) for k in ("input_ids", "attention_mask")}
    out["margin"] = np.asarray([row[2] for row in rows], np.float32)
    return out

  def loss(self, forward, batch):
    ids = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])
    mask = batch["attention_mask"].reshape(ids.shape)
    hidden = forward.apply(ids, mask, return_hidden=True)
    r = scores(hidden, mask, forward.params["score"]["kernel"])[:, 0].reshape(-1, 2)
    return losses.reward_loss(r[:, 0], r[:, 1], batch["margin"] if self.margin_scale else None,
                             self.center_rewards or None)

  def evaluate(self, config, forward, tokenizer, examples, mesh=None):
    texts = sorted({t for ex in examples for t in (ex["chosen"], ex["rejected"])})
    value = dict(zip(texts, rewards(forward.model, forward.params, tokenizer, texts, config.eval.batch_size,
                                    config.data.max_length)))
    chosen = np.asarray([value[ex["chosen"]] for ex in examples])
    rejected = np.asarray([value[ex["rejected"]] for ex in examples])
    margin = np.asarray([ex["margin"] for ex in examples], np.float32)
    diff = chosen - rejected - (margin if self.margin_scale else 0.0)
    out = {"loss": float(np.mean(np.logaddexp(0.0, -diff))), "accuracy": float(np.mean(chosen > rejected)),
           "margin": float(np.mean(chosen - rejected))}
    if self.source == "ratings":
      out.update(rating_report(examples, chosen, rejected, value))
    return out


def rating_report(examples, chosen, rejected, value: dict) -> dict:
  """Pairwise accuracy by rating-difference bucket and Spearman's rho of rewards with the human ratings."""
  from scipy.stats import spearmanr

  out = {}
  buckets = [pd.rating_buckets(ex["chosen_score"] - ex["rejected_score"],
                               np.sign(ex["chosen_score"]) == np.sign(ex["rejected_score"])) for ex in examples]
  for bucket in pd.BUCKETS:
    hit = [c > r for c, r, b in zip(chosen, rejected, buckets) if b == bucket]
    if hit:
      out[f"accuracy/{bucket}"] = float(np.mean(hit))
      out[f"pairs/{bucket}"] = len(hit)
  rated = {}
  for ex in examples:
    rated[ex["chosen"]], rated[ex["rejected"]] = ex["chosen_score"], ex["rejected_score"]
  texts = sorted(rated)
  out["spearman"] = float(spearmanr([value[t] for t in texts], [rated[t] for t in texts]).statistic)
  return out
