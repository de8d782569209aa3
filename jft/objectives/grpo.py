"""Online RL with GRPO: sample a group of completions per prompt, reward them, push up the better ones.

Each step (`rollout`, outside the jitted step): `train.batch_size / group_size`
prompts, each completed `group_size` times by the current policy with the
KV-cache decoder (temperature sampling), scored by the configured reward
(`jft.objectives.reward_functions`: a function, a reward-model run, ...), advantages normalised
within each group. The step (`loss`) then minimises TRL's clipped surrogate
plus `beta` x the k3 estimate of KL(policy || reference), the reference being
the base view of the same tree (the adapter switched off). With one update
per rollout (as here, TRL's default) the old policy is the current one, so the
ratio is 1 in value and the clip only shapes the gradient's bookkeeping.

Prompts: the first `prompt_words` words of each text of `data.text_field`
(0 = the whole text), through `data.template`. Evaluation samples one
completion per held-out prompt and reports the reward, the judge's score (a
scorer the policy never trained against) and the KL to the reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jft.objectives import losses, reward_functions as rewards
from jft import data
from jft.models import head
from jft.core import progress
from jft.models.generate import Sampling, generate, stop_token_ids
from jft.core.fields import Choice, Flag, Float, Int, Text
from jft.objectives import api
from jft.objectives.preference import policy_logps, reference_logps


@functools.partial(jax.jit, static_argnames=("model",))
def _sequence_kl(model, params, reference, ids, mask, completion):
  """[B] sum over completion tokens of log pi - log ref (sampled from pi: an estimate of KL(pi || ref))."""
  logps = lambda p: head.model_logps(functools.partial(model.apply, {"params": p}), p, ids, mask, completion)
  return (logps(params) - logps(reference)).sum(-1)


@dataclasses.dataclass(frozen=True)
class GRPO(api.Objective):
  name: ClassVar[str] = "grpo"
  online: ClassVar[bool] = True
  reward: str = ""  # jft.objectives.reward_functions spec: "run:DIR", "module:function", "file.py:function", "vader"
  judge: str = ""  # optional second scorer, evaluation only ("run:DIR" of a sentiment classifier...)
  group_size: int = 8
  max_new_tokens: int = 24
  temperature: float = 1.0
  top_k: int = 0
  epsilon: float = 0.2
  beta: float = 0.04
  loss_type: str = "grpo"
  scale_rewards: bool = True
  prompt_words: int = 4
  samples_shown: int = 3
  hparam_rules: ClassVar[dict] = {
      "reward": Text(note="a reward spec (jft.objectives.reward_functions): run:DIR, module:function, "
                     "file.py:function, vader"),
      "judge": Text(note="'' = none"), "group_size": Int(2, note="advantages compare a prompt's completions"), "max_new_tokens": Int(1),
      "temperature": Float(0, note="0 = greedy"), "top_k": Int(0, note="0 = off"), "epsilon": Float(0),
      "beta": Float(0, note="0 = no KL term, no reference model"),
      "loss_type": Choice(lambda: losses.GRPO_LOSSES), "scale_rewards": Flag(),
      "prompt_words": Int(0, note="0 = the whole text"), "samples_shown": Int(0)}

  @property
  def uses_reference(self) -> bool:
    return self.beta != 0.0

  def rows_per_batch(self, batch_size: int) -> int:
    if batch_size % self.group_size:
      raise api.ObjectiveError(f"grpo: train.batch_size={batch_size} completions is not a multiple of "
                               f"group_size={self.group_size}")
    return batch_size // self.group_size

  # -- data: prompts -----------------------------------------------------------

  def examples(self, d, tokenizer, split, limit):
    out = []
    for i, row in enumerate(data.load_split(d.path, split, **data.holdout_of(d))):
      if limit is not None and i >= limit:
        break
      text = str(data.field(row, d.text_field, "GRPO prompts"))
      words = text.split()[:self.prompt_words] if self.prompt_words else text.split()
      out.append({"prompt": data.render_prompt(tokenizer, " ".join(words), d.template, d.chat, d.system)})
    return out

  def rows(self, examples, tokenizer, d):
    out = []
    for ex in examples:
      ids = tokenizer(ex["prompt"], add_special_tokens=not d.chat)["input_ids"]
      if len(ids) + self.max_new_tokens > d.max_length:
        ids = ids[-(d.max_length - self.max_new_tokens):] if d.max_length > self.max_new_tokens else ids[-1:]
      out.append((np.asarray(ids, np.int32), np.ones(len(ids), np.int32)))
    return out

  def collate(self, rows, length, pad_id):
    return {"prompts": [x for x, _ in rows]}

  # -- rollout ---------------------------------------------------------------

  def complete(self, forward: api.Forward, tokenizer, prompts, n: int, seed: int, temperature=None,
               progress_desc=None):
    """-> (prompt texts, completion texts, [N] prompt ids, [N] completion ids, truncated flags), n per prompt."""
    sampling = Sampling(max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature if temperature is None else temperature, top_k=self.top_k)
    repeated = [list(map(int, p)) for p in prompts for _ in range(n)]
    stops = stop_token_ids(forward.model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    outs = generate(forward.model, forward.params, repeated, sampling, stop_tokens=stops, seed=seed, pad_id=pad,
                    progress_desc=progress_desc)
    stop_set = set(stops)
    truncated = [not (o and o[-1] in stop_set) for o in outs]
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in repeated]
    return prompt_texts, texts, repeated, outs, truncated

  def rollout(self, batch, forward: api.Forward, tokenizer, seed: int, where: str):
    """Prompts -> a training batch of prompt + completion rows with group-normalised advantages."""
    prompt_texts, texts, prompt_ids, completion_ids, truncated = self.complete(
        forward, tokenizer, batch["prompts"], self.group_size, seed)
    scores = rewards.call(self.reward, prompt_texts, texts, where)
    advantages = np.asarray(losses.group_advantages(scores, self.group_size, scale=self.scale_rewards))
    rows = [(np.asarray(p + c, np.int32), np.asarray([0] * len(p) + [1] * len(c), np.int32))
            for p, c in zip(prompt_ids, completion_ids)]
    length = -(-max(len(x) for x, _ in rows) // 16) * 16
    out = data.pad_batch(rows, length, tokenizer.pad_token_id or 0)
    out["advantages"] = advantages.astype(np.float32)
    grouped = scores.reshape(-1, self.group_size)
    info = {"reward": float(scores.mean()), "reward_std": float(grouped.std(axis=1, ddof=1).mean()),
            "completions/mean_length": float(np.mean([len(c) for c in completion_ids])),
            "completions/clipped_ratio": float(np.mean(truncated))}
    return out, info

  def loss(self, forward, batch):
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    logps = policy_logps(forward, ids, mask, completion)
    old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
    ref = reference_logps(forward, ids, mask, completion) if self.beta else None
    loss, metrics = losses.grpo_loss(logps, old, ref, batch["advantages"], completion, epsilon=self.epsilon,
                                    beta=self.beta, loss_type=self.loss_type,
                                    max_completion_length=self.max_new_tokens)
    return loss, {**metrics, "completion_tokens": completion.sum()}

  # -- evaluation --------------------------------------------------------------

  def _generations(self, forward, tokenizer, examples, d):
    prompts = [x for x, _ in self.rows(examples, tokenizer, d)]
    return self.complete(forward, tokenizer, prompts, 1, seed=0, progress_desc="sampling (tokens)")

  def evaluate(self, config, forward, tokenizer, examples, mesh=None):
    prompt_texts, texts, prompt_ids, completion_ids, truncated = self._generations(
        forward, tokenizer, examples, config.data)
    out = {"reward": float(rewards.call(self.reward, prompt_texts, texts, "evaluation").mean()),
           "completions/mean_length": float(np.mean([len(c) for c in completion_ids]))}
    if self.judge:
      judged = rewards.call(self.judge, prompt_texts, texts, "evaluation (judge)")
      out["judge"] = float(judged.mean())
      out["judge/positive_fraction"] = float(np.mean(judged > 0.5))
    if forward.reference is not None:
      kls = []
      for start in progress.track(range(0, len(texts), config.eval.batch_size),
                                  -(-len(texts) // config.eval.batch_size), "KL to the reference (batches)"):
        rows = [(np.asarray(p + c, np.int32), np.asarray([0] * len(p) + [1] * len(c), np.int32))
                for p, c in zip(prompt_ids[start:start + config.eval.batch_size],
                                completion_ids[start:start + config.eval.batch_size])]
        b = data.pad_batch(rows, -(-max(len(x) for x, _ in rows) // 16) * 16, tokenizer.pad_token_id or 0)
        kls.append(np.asarray(_sequence_kl(forward.model, forward.params, forward.reference,
                                           jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
                                           jnp.asarray(b["loss_mask"]))))
      out["kl"] = float(np.concatenate(kls).mean())
    return out

  def samples(self, config, forward, tokenizer, examples):
    examples = examples[:self.samples_shown]
    if not examples:
      return []
    prompt_texts, texts, *_ = self._generations(forward, tokenizer, examples, config.data)
    scores = rewards.call(self.reward, prompt_texts, texts, "samples")
    return [{"prompt": p, "generated": f"{t.strip()}  [reward {s:.3f}]"}
            for p, t, s in zip(prompt_texts, texts, scores)]
