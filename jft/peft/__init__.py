"""Fine-tuning methods as functional transforms of parameter trees (see api.py).

Every module of this package is imported here, and defining a `Method`
subclass registers it: a new method is one new file. Pick one by name from
a config with `build("lora", rank=8, ...)`.

Layer 3 (imports models/, quant/ and core/).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from jft.peft.api import (ALIASES, HPARAM_RULES, METHODS, NAME_RULE, Compose, Leaf, Method, MethodError, ParamCount,
                          build, combine, count, decay_mask, from_hparams, hparam_problems, labels, mask, split,
                          trainable_paths)

for _module in _pkgutil.iter_modules(__path__):
  _importlib.import_module(f"{__name__}.{_module.name}")

# Every registered method class by its Python name (peft.LoRA, peft.Bottleneck, ...).
globals().update({_cls.__name__: _cls for _cls in METHODS.values()})
