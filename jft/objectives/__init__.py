"""Training objectives (see api.py): what a step minimises and what evaluation reports.

Every module of this package is imported here and defining an `Objective`
subclass registers it: a new objective is one new file. A config picks one
with `objective.name` (and `objective.hparams`).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from jft.objectives.api import (OBJECTIVES, Forward, Objective, ObjectiveError, base_view, build,
                                check_base_view, default_hparams, from_config, mean_loss)

for _module in _pkgutil.iter_modules(__path__):
  _importlib.import_module(f"{__name__}.{_module.name}")
