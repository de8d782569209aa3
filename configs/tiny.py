"""A tiny run for tests: any HF folder as the model (tests build a random 2-layer Llama).

    jft train --config configs/tiny.py --config.model.name=/tmp/tiny-llama --workdir /tmp/run
"""

import os

from jft.config import REQUIRED, default_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = parse_arg(arg, method="lora", steps=8)
  c = default_config()
  c.model.name = REQUIRED
  c.method.name = arg.method
  c.method.hparams = {"lora": dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))}.get(arg.method, {})
  c.data.update(path=os.path.join(os.path.dirname(HERE), "data", "sentiment"),
                chat=True, template="Sentiment?\n{text}", max_length=48, max_train_examples=48,
                max_eval_examples=8, max_test_examples=8)
  c.train.update(steps=arg.steps, batch_size=4, log_every=1, eval_every=4, save_every=2, keep=10)
  c.optim.update(lr=1e-2, warmup_steps=1)
  c.eval.update(batch_size=8)
  return c


def sweep(arg=None):
  """A small study for tests: LoRA rank x learning rate, and IA3 at two learning rates."""
  from jft.sweep import Space, grid

  return [Space({"method.hparams.rank": grid(2, 4), "optim.lr": grid(1e-3, 1e-2)}),
          Space({"arg:method": grid("ia3"), "optim.lr": grid(1e-2)})]
