"""A trained run as a reward function (`run:DIR` in a GRPO config or `jft pairs --reward`).

`jft.objectives.reward_functions` reads reward specs; a run folder is read
here, a layer above, and registered there by name when `jft.run` is imported.
"""

from __future__ import annotations

import os

import numpy as np

from jft import data, objectives
from jft.objectives import reward_functions, reward_model
from jft.objectives.evaluate import label_token_ids
from jft.run.assemble import restore


def run_scorer(workdir: str) -> reward_functions.RewardFn:
  """A trained jft run as a reward: its reward head, or its classifier's probability of the last label."""
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise reward_functions.RewardError(f"reward run:{workdir}: not a run folder (no config.json)")
  r = restore(workdir, "best")
  params, d = r.params(), r.config.data
  objective = objectives.from_config(r.config)
  render = lambda text: data.render_prompt(r.tokenizer, text, d.template, d.chat, d.system)
  if objective.name == "reward":
    return lambda prompts, completions: reward_model.rewards(
        r.model, params, r.tokenizer, [render(p + c) for p, c in zip(prompts, completions)],
        r.config.eval.batch_size, d.max_length)
  if objective.name == "classification":
    label_ids = np.asarray(label_token_ids(r.tokenizer, tuple(d.labels), d.chat))
    return lambda prompts, completions: reward_functions.label_probability(
        r.model, params, r.tokenizer, [render(p + c) for p, c in zip(prompts, completions)], label_ids, d.chat,
        r.config.eval.batch_size)
  raise reward_functions.RewardError(f"reward run:{workdir}: a {objective.name} run scores nothing; use a "
                                     "reward or classification run")


reward_functions.SCHEMES["run"] = run_scorer
