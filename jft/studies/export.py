"""A run's adapter out of jft (`jft export`), in one of three formats:

    peft       the `peft` library's adapter folder (adapter_config.json + adapter_model.safetensors),
               loadable by `peft.PeftModel.from_pretrained` on the base model
    merged     the adapter folded into the base: a plain transformers checkpoint of the model's family
               (dequantized when the base was quantized)
    trainable  jft's own: the trainable leaves (trainable.safetensors) and the method's hyperparameters
               (method.json); every trained leaf, for any method

The output folder is written through `jft.core.files` (never into the run or over its base; a
non-empty folder needs `overwrite`; written beside and renamed in, so nothing half-written is left).
"""

from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import save_file

from jft import peft, quant, run
from jft.core import files, rules
from jft.models.hf import family_module
from jft.models.keymap import active_keys
from jft.models.pretrained import save_pretrained
from jft.peft import peft_format

FORMATS = ("peft", "merged", "trainable")


def export(workdir: str, out: str, format: str, checkpoint: str = "best", overwrite: bool = False) -> str:
  """Write run `workdir`'s `checkpoint` ("best" or "latest") to `out` as `format`; -> `out`."""
  if format not in FORMATS:
    raise peft.MethodError(f"export format {format!r}; choose one of {', '.join(FORMATS)}")
  out = files.check_output(out, overwrite=overwrite, protected=(workdir,))
  r = run.restore(workdir, checkpoint)
  # The method's tree, not the model's view (`r.params()`): materializing drops what only the method
  # reads (VeRA's shared projections, P-tuning's encoder), and merge/export materialize themselves.
  tree = r.tree()
  if format == "merged":  # refused before anything is written
    merged, _ = r.method.merge(tree)
    check_mergeable(r.method, merged, r.model.config)

  def write(folder):
    if format == "peft":
      peft_format.export_peft(r.method, tree, r.model.config, folder, base_model=r.config.model.name)
    elif format == "merged":
      dense = {p: (quant.dequantize(v) if quant.is_quantized(v) else v) for p, v in rules.flatten(merged).items()}
      save_pretrained(r.model, rules.unflatten(dense), folder, tokenizer=r.tokenizer)
    else:
      write_trainable(r.method, tree, folder)

  files.write_folder(out, write)
  return out


def write_trainable(method, tree, folder: str):
  """jft's own format: the trainable leaves as safetensors, the method's hyperparameters as JSON."""
  trainable, _ = peft.split(method, tree)
  os.makedirs(folder, exist_ok=True)
  save_file({p: np.asarray(v) for p, v in rules.flatten(trainable).items()}, os.path.join(folder, "trainable.safetensors"))
  files.write_json(os.path.join(folder, "method.json"), method.hparams())


def check_mergeable(method, merged, config):
  """A merged tree must be a plain checkpoint of the model's family: a leaf the transformers layout has
  no place for (BitFit's new biases on Llama, P-tuning's prompt, a reward head) would be dropped silently."""
  kept = {key.path for key in active_keys(family_module(config.family).KEYS, config)}
  dropped = sorted(set(rules.flatten(merged)) - kept)
  if dropped:
    name = "+".join(m.name for m in method.methods) if isinstance(method, peft.Compose) else method.name
    raise peft.MethodError(f"{name} cannot be merged into a {config.family} transformers checkpoint: it has no "
                           f"place for {', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''} (the export "
                           "would drop them); --format trainable keeps every trained leaf")
