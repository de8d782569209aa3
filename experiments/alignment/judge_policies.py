"""Score the policies of several runs on the same held-out review prompts, side by side.

    python experiments/alignment/judge_policies.py runs/reviews runs/dpo \
        --score run:runs/reward --score vader --prompts 200 --out experiments/alignment/dpo-judged.json

Each run samples one completion (temperature 1, up to 24 tokens) for the
first four words of each of the first `--prompts` reviews of the test split
of `--data` (as GRPO's evaluation builds them); every `--score` (a
`jft.objectives.reward_functions` spec) scores every completion. Reported per run and score: the
mean and the fraction above the score's positive threshold (0.5 for a
probability, 0 for a reward model, 0.05 for vaderSentiment's compound score).
A scorer the policy never trained against (vader for a policy trained on a
reward model's pairs) is the fair judge.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from jft import objectives, run
from jft.objectives import reward_functions as rewards

THRESHOLDS = {"vader": 0.05}  # vaderSentiment's own "positive" cut on the compound score


def threshold(spec: str) -> float:
  if spec in THRESHOLDS:
    return THRESHOLDS[spec]
  if spec.startswith("run:"):  # a classifier gives P(positive), a reward model an unbounded score
    objective = run.read_config(spec[4:], report=lambda _: None).objective.name
    return 0.0 if objective == "reward" else 0.5
  return 0.0


def judge(workdirs, scores, data_path, prompts, seed=0) -> dict:
  sampler = objectives.build("grpo", reward=scores[0], group_size=2, max_new_tokens=24, temperature=1.0,
                             prompt_words=4)
  out = {}
  for workdir in workdirs:
    r = run.restore(workdir, "best")
    d = r.config.data.copy_and_resolve_references()
    d.update(path=data_path, chat=False, template="{text}", max_length=max(d.max_length, 64))
    examples = sampler.examples(d, r.tokenizer, "test", prompts)
    rows = [ids for ids, _ in sampler.rows(examples, r.tokenizer, d)]
    forward = objectives.Forward(r.model, r.model, r.params())
    texts_p, texts_c, *_ = sampler.complete(forward, r.tokenizer, rows, 1, seed=seed,
                                            progress_desc=f"{workdir}: sampling (tokens)")
    row = {"step": r.step, "samples": [{"prompt": p, "completion": c} for p, c in zip(texts_p[:5], texts_c[:5])]}
    for spec in scores:
      s = rewards.call(spec, texts_p, texts_c, f"{workdir} ({spec})")
      row[spec] = {"mean": float(s.mean()), "positive_fraction": float(np.mean(s > threshold(spec))),
                   "threshold": threshold(spec)}
    out[workdir] = row
    print(json.dumps({workdir: {k: v for k, v in row.items() if k != "samples"}}), flush=True)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("runs", nargs="+", help="run folders (their best checkpoints)")
  p.add_argument("--score", action="append", required=True, help="a jft.objectives.reward_functions spec; repeat for several")
  p.add_argument("--data", default=os.path.join(ROOT, "data", "sentiment"), help="reviews with a test split")
  p.add_argument("--prompts", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="write the results (with 5 samples per run) as JSON")
  args = p.parse_args(argv)
  result = {"prompts": args.prompts, "data": args.data, "runs": judge(args.runs, args.score, args.data, args.prompts,
                                                                       args.seed)}
  if args.out:
    run.write_json(args.out, result)


if __name__ == "__main__":
  main()
