"""Training objectives (see api.py): what a step minimises and what evaluation reports.

Every module of this package is imported here and defining an `Objective`
subclass registers it: a new objective is one new file, its hyperparameters'
rules beside its fields (`hparam_rules`), its public losses in its `__all__`
(exported here, and under the former name `jft.align`). A config picks one
with `objective.name` (and `objective.hparams`).

    api.py               what an objective is; the reference model = the base view
    losses.py            the pure losses (DPO family, ORPO, KTO, reward, GRPO), checked against TRL
    language.py          lm, sft, classification (a label word as the response)
    instruct.py          instruction tuning, with generations in the summary
    preference.py        dpo, orpo, kto (pairs or unpaired feedback)
    simpo.py             simpo (reference-free, length-normalised)
    reward_model.py      reward: a score head trained on pairs or ratings
    grpo.py              grpo: online RL from reward functions
    reward_functions.py  what GRPO's rewards and judges are (functions, files, `run:DIR` via jft.run)
    evaluate.py          loss/perplexity, label-word accuracy, exact match

Layer 4: imports data/, models/, peft/, sharding and below; never config/ or run/.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from jft.objectives.api import (OBJECTIVES, Forward, Objective, ObjectiveError, base_view, build,
                                check_base_view, default_hparams, from_config, hparam_problems, mean_loss,
                                method_of)

# Each module's public functions (its `__all__`: losses, log-probs) are names of this package too, so
# `jft.objectives.preference_loss` (and its former name `jft.align.preference_loss`) find a loss
# wherever its objective's file defines it.
for _module in _pkgutil.iter_modules(__path__):
  _loaded = _importlib.import_module(f"{__name__}.{_module.name}")
  for _name in getattr(_loaded, "__all__", ()):
    if _name in globals() and globals()[_name] is not getattr(_loaded, _name):
      raise ImportError(f"jft.objectives: {_name} is defined twice ({_loaded.__name__} and elsewhere)")
    globals()[_name] = getattr(_loaded, _name)
