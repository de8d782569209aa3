"""Fine-tuning methods as functional transforms of parameter trees (see api.py).

Pick a method by name from a config with `build("lora", rank=8, ...)`.
"""

from jft.peft.adapters import Adapters
from jft.peft.api import (Compose, Method, MethodError, ParamCount, combine, count, labels, mask, split,
                          trainable_paths)
from jft.peft.bitfit import BitFit
from jft.peft.full import Full
from jft.peft.ia3 import IA3
from jft.peft.lora import DoRA, LoRA
from jft.peft.prefix import Prefix
from jft.peft.prompt import PromptTuning, PTuning

METHODS = {m.name: m for m in (Full, LoRA, DoRA, Adapters, Prefix, PromptTuning, PTuning, BitFit, IA3)}


def build(name: str, **kwargs) -> Method:
  """A method from its registered name and hyperparameters, with named errors."""
  import dataclasses
  import difflib

  if name not in METHODS:
    close = difflib.get_close_matches(name, METHODS, n=3)
    raise MethodError(f"unknown method {name!r}; available: {', '.join(METHODS)}"
                      + (f" (did you mean {', '.join(close)}?)" if close else ""))
  cls = METHODS[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise MethodError(f"{name}: unknown hyperparameter(s) {unknown}; valid: {sorted(fields)}")
  return cls(**kwargs)
