"""Training objectives (see api.py): what a step minimises and what evaluation reports.

Every module of this package is imported here and defining an `Objective`
subclass registers it: a new objective is one new file. A config picks one
with `objective.name` (and `objective.hparams`).
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
