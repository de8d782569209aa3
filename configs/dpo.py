"""Preference optimisation (DPO / IPO / hinge; ORPO; KTO; SimPO) of SmolLM2 with LoRA, the base as the reference.

    python scripts/fetch_llamafactory_data.py          # once: data/llamafactory/ (CC BY-NC 4.0, non-commercial)
    jft train --config configs/dpo.py --workdir runs/dpo                               # DPO, sigmoid loss
    jft train --config configs/dpo.py:objective=kto --workdir runs/kto
    jft train --config configs/dpo.py:objective=simpo --workdir runs/simpo                # no reference model
    jft train --config configs/dpo.py --config.objective.hparams.loss_type=ipo --workdir runs/ipo
    jft train --config configs/dpo.py --config.data.path=pairs.jsonl --init-from runs/sft --workdir runs/dpo2

Data: any preference file or folder (prompt/chosen/rejected, TRL's
conversational layout, ShareGPT conversations); the default is
LLaMA-Factory's `dpo_en_demo.json` (300 ShareGPT pairs, rendered with the
model's chat template), split 90/10. With `--init-from RUN` the earlier run's
merged adapter is both the start and the reference.
"""

import os

from jft import objectives
from jft.config import default_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(os.path.dirname(HERE), "data", "llamafactory", "dpo_en_demo.json")


def get_config(arg=None):
  arg = parse_arg(arg, objective="dpo", mode="full")
  if arg.objective not in ("dpo", "orpo", "kto", "simpo"):
    raise ValueError(f"objective={arg.objective!r}; choose dpo, orpo, kto or simpo")
  c = default_config()
  c.method.hparams = dict(rank=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
  c.objective.name = arg.objective
  c.objective.hparams = objectives.default_hparams(arg.objective)
  # The longest completion of the demo set is 1,182 SmolLM2 tokens; prompts are cut from the left to fit.
  c.data.update(path=DATA, chat=True, max_length=1280, bucket=4, holdout=0.1, test_split="")
  c.optim.update(lr=5e-5 if arg.objective != "orpo" else 2e-4, warmup_steps=5)
  c.eval.update(batch_size=4, metric="rewards/accuracies" if arg.objective in ("dpo", "simpo") else "loss", zero_shot=False)
  if arg.mode == "full":
    c.train.update(steps=60, batch_size=4, log_every=5, eval_every=30, save_every=20)
  elif arg.mode == "local":
    c.train.update(steps=2, batch_size=2, log_every=1, eval_every=0, save_every=2)
    c.data.update(max_train_examples=8, max_eval_examples=2)
  else:
    raise ValueError(f"mode={arg.mode!r}; choose full or local")
  return c
