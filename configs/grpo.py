"""RLHF with GRPO: make SmolLM2 continue movie reviews so that they turn out positive.

    jft train --config configs/grpo.py:stage=sft --workdir runs/reviews          # 1. write reviews at all
    jft train --config configs/reward.py --workdir runs/reward                    # 2. a reward model
    jft train --config configs/grpo.py --init-from runs/reviews --workdir runs/grpo \\
        --config.objective.hparams.reward=run:runs/reward \\
        --config.objective.hparams.judge=run:runs/quickstart                      # 3. GRPO (< 15 min)

Stage `sft`: language modelling on the embedded review snippets (LoRA).
Stage `rl`: prompts are the first four words of a training review; G = 8
completions each, rewarded by the reward model; the reference is the SFT
model (the adapter switched off). Judged on 200 held-out test prompts by a
scorer the policy never trained against: the LoRA sentiment classifier of
`make demo` (P(positive) > 0.5).
"""

import os

from jft import objectives
from jft.config import default_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = parse_arg(arg, stage="rl", mode="full")
  c = default_config()
  c.method.hparams = dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
  c.data.update(path=os.path.join(os.path.dirname(HERE), "data", "sentiment"), chat=False, template="{text}",
                max_length=64, test_split="")
  c.eval.update(batch_size=32, zero_shot=True, zero_shot_split="eval")
  if arg.stage == "sft":
    c.objective.name = "lm"
    c.optim.update(lr=5e-4, warmup_steps=10)
    c.data.update(max_eval_examples=200)
    c.train.update(steps=100, batch_size=8, log_every=10, save_every=50)
    c.eval.update(metric="loss", zero_shot=False)
  elif arg.stage == "rl":
    c.objective.name = "grpo"
    c.objective.hparams = objectives.default_hparams("grpo")
    c.objective.hparams.update(group_size=8, max_new_tokens=24, beta=0.04, prompt_words=4, temperature=1.0)
    # lr 2e-3: at 5e-4 the policy barely moved for 40 steps (KL 0.05); at 2e-3 the judged positive
    # fraction is +0.23 at step 20 and +0.32 at step 30 (experiments/alignment/grpo-summary.md)
    c.optim.update(lr=2e-3, warmup_steps=5, schedule="constant")
    c.data.update(eval_split="test", max_eval_examples=200)
    # 2 prompts x 8 completions a step (~14 s on 2 cores); evaluated before (zero-shot) and after:
    # the whole run, both evaluations included, within 15 minutes
    c.train.update(steps=30, batch_size=16, log_every=5, eval_every=0, save_every=10)
    c.eval.update(metric="judge/positive_fraction")
  else:
    raise ValueError(f"stage={arg.stage!r}; choose sft or rl")
  if arg.mode == "local":
    c.train.update(steps=4, log_every=2, eval_every=2, save_every=2)
    c.data.update(max_train_examples=64, max_eval_examples=8)
  elif arg.mode != "full":
    raise ValueError(f"mode={arg.mode!r}; choose full or local")
  return c
