"""jft: performance-efficient fine-tuning of LLMs in JAX/Flax."""

import importlib
import importlib.util
import os

# transformers' tokenizers and configs are all jft uses of it: its "PyTorch was not found" advice is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

# The top-level names load JAX on first use, not on `import jft`: the `jft` command re-executes itself
# (jft.host_memory) before anything heavy is imported, and `jft --help` answers at once.
_LAZY = {name: "jft.models" for name in
         ("ModelConfig", "Transformer", "load_pretrained", "load_tokenizer", "save_pretrained", "save_quantized")}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # `import jft; jft.peft...` as before
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module 'jft' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
