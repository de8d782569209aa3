"""A tiny run for tests: any HF folder as the model (tests build a random 2-layer Llama).

    jft train --config configs/tiny.py --config.model.name=/tmp/tiny-llama --workdir /tmp/run
    jft train --config configs/tiny.py:objective=dpo --config.model.name=... --config.data.path=pairs.jsonl ...

`objective` picks any registered objective with all its hyperparameters in
the config; the preference objectives need `data.path` (a preference file),
`grpo` needs `objective.hparams.reward`.
"""

import os

from jft import objectives
from jft.config import REQUIRED, default_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))
SENTIMENT = os.path.join(os.path.dirname(HERE), "data", "sentiment")


def get_config(arg=None):
  arg = parse_arg(arg, method="lora", steps=8, objective="classification")
  c = default_config()
  c.model.name = REQUIRED
  c.method.name = arg.method
  c.method.hparams = {"lora": dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))}.get(arg.method, {})
  c.objective.name = arg.objective
  c.objective.hparams = objectives.default_hparams(arg.objective)
  c.data.update(path=SENTIMENT, chat=True, template="Sentiment?\n{text}", max_length=48, max_train_examples=48,
                max_eval_examples=8, max_test_examples=8)
  c.train.update(steps=arg.steps, batch_size=4, log_every=1, eval_every=4, save_every=2, keep=10)
  c.optim.update(lr=1e-2, warmup_steps=1)
  c.eval.update(batch_size=8)
  if arg.objective in ("dpo", "orpo", "kto", "simpo"):
    c.data.update(path=REQUIRED, template="{text}", max_length=64, test_split="")
    c.eval.update(metric="loss", zero_shot=False)
  elif arg.objective == "reward":
    c.objective.hparams.update(train_pairs=32, eval_pairs=16)
    c.data.update(template="Review: {text}", chat=False, max_length=64, max_train_examples=0,
                  max_eval_examples=0, max_test_examples=0, test_split="")
    c.eval.update(metric="accuracy", zero_shot=False)
  elif arg.objective == "grpo":
    c.objective.hparams.update(reward=REQUIRED, group_size=4, max_new_tokens=8, prompt_words=2)
    c.data.update(chat=False, template="{text}", max_length=32, test_split="")
    c.train.update(batch_size=8)
    c.eval.update(metric="reward", zero_shot=False)
  elif arg.objective in ("lm", "instruct"):
    c.eval.update(metric="loss", zero_shot=False)
  return c


def sweep(arg=None):
  """A small study for tests: LoRA rank x learning rate, and IA3 at two learning rates."""
  from jft.studies.space import Space, grid

  return [Space({"method.hparams.rank": grid(2, 4), "optim.lr": grid(1e-3, 1e-2)}),
          Space({"arg:method": grid("ia3"), "optim.lr": grid(1e-2)})]
