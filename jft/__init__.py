"""jft: performance-efficient fine-tuning of LLMs in JAX/Flax.

The package is laid out in layers; a module imports only from its own layer or
below (tests/test_layering.py holds it, README "Layout" walks it):

    core/        L0  errors, path rules, progress, files (atomic writes), folder locks
    quant/       L1  4-bit formats (NF4, int4; blockwise, double-quantized)
    data/        L1  the one data pipeline: files -> rows -> tokens, holdout splits
    models/      L2  Llama-family and GPT-2 in Flax, HF/GGUF loading, the fused head, generation,
                     sharding (meshes; the models' logical axes -> mesh axes)
    peft/        L3  methods: rewrite a params tree into frozen base + trainable leaves
    objectives/  L4  what a step minimises (its loss, data, evaluation, rules beside its fields)
    config/      L5  default config, command-line overrides, the schema that checks a config
    run/         L6  assemble (config -> model, method, objective, optimizer, state), step, train, run folder
    studies/     L7  sweeps, reports, ablations, cost estimates, exports, preference pairs
    serve/       L7  an OpenAI-compatible server: many adapters over one base, continuous batching
    cli/         L8  the `jft` command (the only place for function-local imports)

Modules that moved keep their old names (`jft.align`, `jft.train`, `jft.loss`...):
`_MOVED` maps each to where it lives now, so old scripts, configs and run folders
keep working; it also gives `jft.harness` (the lm-evaluation-harness model) a short
name. `jft.align` is the objectives package itself: every loss an
objective's file exports (`jft.align.preference_loss`, ...).
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

# transformers' tokenizers and configs are all jft uses of it: its "PyTorch was not found" advice is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

# The top-level names load JAX on first use, not on `import jft`: the `jft` command re-executes itself
# (jft.cli.host_memory) before anything heavy is imported, and `jft --help` answers at once.
_LAZY = {name: "jft.models" for name in
         ("ModelConfig", "Transformer", "load_pretrained", "load_tokenizer", "save_pretrained", "save_quantized")}
__all__ = sorted(_LAZY)

# Where the modules of the flat layout (up to December 2026) live now.
_MOVED = {
    "jft.errors": "jft.core.errors", "jft.rules": "jft.core.rules", "jft.progress": "jft.core.progress",
    "jft.files": "jft.core.files", "jft.lock": "jft.core.lock",
    "jft.bnb_numerics": "jft.quant.bnb_numerics",
    "jft.preference_data": "jft.data.preference", "jft.models.token_ids": "jft.data.token_ids",
    "jft.loss": "jft.models.head",
    "jft.align": "jft.objectives", "jft.evaluate": "jft.objectives.evaluate",
    "jft.rewards": "jft.objectives.reward_functions", "jft.objectives.reward": "jft.objectives.reward_model",
    "jft.schema": "jft.config.schema",
    "jft.checkpoint": "jft.run.checkpoint", "jft.optim": "jft.run.optim", "jft.state": "jft.run.state",
    "jft.step": "jft.run.step", "jft.train": "jft.run.train",
    "jft.report": "jft.studies.report", "jft.sweep": "jft.studies.sweep", "jft.ablate": "jft.studies.ablate",
    "jft.estimate": "jft.studies.estimate", "jft.onpolicy": "jft.studies.pairs",
    "jft.host_memory": "jft.cli.host_memory", "jft.sharding": "jft.models.sharding",
    "jft.harness": "jft.studies.harness",  # a short name, not a moved module: `python -m jft.harness`
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """`import jft.align` (and `python -m jft.host_memory`) finds the module where it lives now: the same
  module object, so a patch through either name is seen through both."""

  def find_spec(self, name, path=None, target=None):
    if name in _MOVED:
      return importlib.util.spec_from_loader(name, self)
    return None

  def create_module(self, spec):
    return importlib.import_module(_MOVED[spec.name])

  def exec_module(self, module):
    pass

  def get_code(self, name):  # `python -m` runs the module's own code
    return importlib.util.find_spec(_MOVED[name]).loader.get_code(_MOVED[name])


if not any(isinstance(f, _OldNames) for f in sys.meta_path):
  sys.meta_path.append(_OldNames())


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  if f"{__name__}.{name}" in _MOVED:
    return importlib.import_module(_MOVED[f"{__name__}.{name}"])
  if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # `import jft; jft.peft...` as before
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module 'jft' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
