"""Distillation (GKD, `objective.name="distill"`) on the sentiment task: a teacher into a student, any method.

    jft train --config configs/sentiment.py:method=lora --workdir runs/sentiment-lora     # a teacher
    jft train --config configs/distill.py --config.objective.hparams.teacher=runs/sentiment-lora \\
        --workdir runs/distill
    jft train --config configs/distill.py:student=DIR,on_policy=true,mode=local \\
        --config.objective.hparams.teacher=runs/sentiment-lora --workdir runs/distill-onpolicy

The teacher is a model name or folder, or a jft run folder (its best adapter folded into its base); it must
share the student's tokenizer. Arguments: student (the model trained, default SmolLM2-135M-Instruct: a
pruned or layer-dropped copy of it is the usual student), method and mode as in configs/sentiment.py,
beta (0 = forward KL(teacher || student), 1 = reverse KL), alpha (weight of the next-token loss beside the
divergence), on_policy and lmbda (the fraction of steps on the student's own completions; a label word and
the stop token, so 4 new tokens). The data, prompt and evaluation (accuracy) are configs/sentiment.py's.
"""

import os

from jft import objectives
from jft.config import REQUIRED, parse_arg
from jft.core import files

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = parse_arg(arg, student="smollm2-135m", method="lora", mode="demo", beta=0.5, alpha=0.0, on_policy=False,
                  lmbda=0.5, temperature=1.0)
  sentiment = files.import_file(os.path.join(HERE, "sentiment.py"), ValueError)
  c = sentiment.get_config(f"method={arg.method},mode={arg.mode}")
  c.model.name = arg.student
  c.objective.name = "distill"
  c.objective.hparams = {**objectives.default_hparams("distill"), "teacher": REQUIRED, "beta": arg.beta,
                         "alpha": arg.alpha, "temperature": arg.temperature, "on_policy": arg.on_policy,
                         "lmbda": arg.lmbda, "max_new_tokens": 4, "data_objective": "classification"}
  return c
