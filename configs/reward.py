"""A reward model from human ratings: SmolLM2 + LoRA + a scalar head, on pairs of movie-review snippets.

    jft train --config configs/reward.py --workdir runs/reward

Pairs are two Rotten Tomatoes snippets from the same split of the embedded
sentiment data (Hutto & Gilbert's mean human ratings, -4..4, from the
vaderSentiment 3.3.2 archive); chosen = the higher rating, margin = half the
rating difference. The test split's pairs are held out. Reported: pairwise
accuracy by rating-difference bucket, Spearman's rho of rewards with ratings.
"""

import os

from jft import objectives
from jft.config import default_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = parse_arg(arg, mode="full")
  c = default_config()
  c.method.hparams = dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
  c.objective.name = "reward"
  c.objective.hparams = objectives.default_hparams("reward")
  c.objective.hparams.update(margin_scale=0.5, train_pairs=4000, eval_pairs=300)
  c.data.update(path=os.path.join(os.path.dirname(HERE), "data", "sentiment"), chat=False,
                template="Review: {text}", max_length=96, bucket=8, max_test_examples=1000)
  c.optim.update(lr=1e-3, warmup_steps=10)
  c.eval.update(batch_size=32, metric="accuracy", zero_shot=False)
  if arg.mode == "full":  # about 15 minutes on a 2-core CPU
    c.train.update(steps=250, batch_size=8, log_every=10, eval_every=125, save_every=125)
  elif arg.mode == "local":
    c.train.update(steps=6, batch_size=4, log_every=2, eval_every=3, save_every=3)
    c.objective.hparams.update(train_pairs=64, eval_pairs=16)
    c.data.update(max_test_examples=32)
  else:
    raise ValueError(f"mode={arg.mode!r}; choose full or local")
  return c
