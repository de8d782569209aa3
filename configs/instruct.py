"""Instruction tuning on Alpaca-style data: SmolLM2 + LoRA on LLaMA-Factory's 999-row demo set.

    python scripts/fetch_llamafactory_data.py          # once: data/llamafactory/ (CC BY-NC 4.0, non-commercial)
    jft train --config configs/instruct.py --workdir runs/instruct

The rows (instruction, optional input, output) are split 90/10 by a fixed
seed (`data.holdout`). Prompts use Alpaca's format (`template=chat`: the
model's chat template). Reported: held-out response loss and perplexity
before and after, and three held-out generations before/after in summary.md.
"""

import os

from jft import objectives
from jft.config import default_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(os.path.dirname(HERE), "data", "llamafactory", "alpaca_en_demo.json")


def get_config(arg=None):
  arg = parse_arg(arg, mode="full", template="alpaca")
  if arg.template not in ("alpaca", "chat"):
    raise ValueError(f"template={arg.template!r}; choose alpaca or chat")
  c = default_config()
  c.method.hparams = dict(rank=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
  c.objective.name = "instruct"
  c.objective.hparams = objectives.default_hparams("instruct")
  # The longest response is 594 SmolLM2 tokens: 640 keeps every one whole (prompts are cut first).
  c.data.update(path=DATA, chat=arg.template == "chat", max_length=640, bucket=8, holdout=0.1, test_split="")
  c.optim.update(lr=3e-4, warmup_steps=10)
  c.eval.update(batch_size=8, metric="loss", zero_shot=True, zero_shot_split="eval")
  if arg.mode == "full":  # about 30 minutes on a 2-core CPU: 100 steps x 4 rows (400 of the 899 rows), 3 evaluations
    c.train.update(steps=100, batch_size=4, log_every=10, eval_every=50, save_every=50)
  elif arg.mode == "local":
    c.train.update(steps=4, batch_size=2, log_every=2, eval_every=2, save_every=2)
    c.data.update(max_train_examples=16, max_eval_examples=4)
    c.objective.hparams.update(samples_shown=1, max_new_tokens=8)
  else:
    raise ValueError(f"mode={arg.mode!r}; choose full or local")
  return c
