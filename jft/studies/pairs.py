"""Preference pairs sampled from a policy and ranked by a reward: on-policy data for DPO.

    jft pairs RUN --reward run:runs/reward --out pairs.jsonl [--prompts 400 --samples 4]

For each prompt (the first words of a text of the run's data, as GRPO
builds them) the policy of RUN samples `samples` completions; of those with
any text, the highest- and lowest-rewarded become `chosen` and `rejected`
(a group with fewer than two, or all rewards equal, is skipped: preference
data refuses an empty completion). Rows
are written in the common prompt/chosen/rejected layout (plus both rewards),
which `configs/dpo.py` reads with `--config.data.path=pairs.jsonl`.
"""

from __future__ import annotations

import json

from jft.core import files, progress
from jft import objectives, run
from jft.objectives import reward_functions as rewards


def preference_pairs(workdir: str, reward: str, out: str, *, prompts: int = 400, samples: int = 4,
                     prompt_words: int = 4, max_new_tokens: int = 24, temperature: float = 1.0, split: str = "train",
                     batch_prompts: int = 8, seed: int = 0, overwrite: bool = False, echo=print) -> dict:
  """Write `out` (JSONL, whole or not at all); -> counts. The prompts' texts come from RUN's `data.path`
  split `split`. `out` is checked first (`files.check_output`): never a run's file, and an existing file
  only with `overwrite`."""
  out = files.check_output(out, overwrite=overwrite, folder=False, protected=(workdir,))
  r = run.restore(workdir, "best")
  sampler = objectives.build("grpo", reward=reward, group_size=max(samples, 2), max_new_tokens=max_new_tokens,
                             temperature=temperature, prompt_words=prompt_words)
  examples = sampler.examples(r.config.data, r.tokenizer, split, prompts)
  rows = [ids for ids, _ in sampler.rows(examples, r.tokenizer, r.config.data)]
  forward = objectives.Forward(r.model, r.model, r.params())
  written = ties = 0
  with files.write_file(out) as f:
    for start in progress.track(range(0, len(rows), batch_prompts), -(-len(rows) // batch_prompts),
                                "sampling pairs (batches)"):
      texts_p, texts_c, *_ = sampler.complete(forward, r.tokenizer, rows[start:start + batch_prompts],
                                              sampler.group_size, seed=seed + start)
      scores = rewards.call(reward, texts_p, texts_c, f"prompts {start}..").reshape(-1, sampler.group_size)
      for g, group in enumerate(scores):
        i = g * sampler.group_size
        picked = pick_pair(group, texts_c[i:i + sampler.group_size])
        if picked is None:
          ties += 1
          continue
        hi, lo = picked
        # One leading space off: plain-text completions are tokenized with one (`jft.data.response_ids`).
        strip = lambda text: text[1:] if text.startswith(" ") else text
        f.write(json.dumps({"prompt": texts_p[i], "chosen": strip(texts_c[i + hi]), "rejected": strip(texts_c[i + lo]),
                            "chosen_reward": float(group[hi]), "rejected_reward": float(group[lo])}) + "\n")
        written += 1
      echo(f"{min(start + batch_prompts, len(rows))}/{len(rows)} prompts, {written} pairs")
  return {"pairs": written, "ties": ties, "prompts": len(rows)}


def pick_pair(scores, completions) -> tuple[int, int] | None:
  """(chosen, rejected) indices of one prompt's group: the highest- and lowest-scored completion with any
  text; None when fewer than two have text or their scores are all equal."""
  usable = [k for k, text in enumerate(completions) if text.strip()]
  if len(usable) < 2:
    return None
  hi = max(usable, key=lambda k: scores[k])
  lo = min(usable, key=lambda k: scores[k])
  return None if scores[hi] == scores[lo] else (hi, lo)
