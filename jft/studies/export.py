"""A run's adapter out of jft (`jft export`), in one of five formats:

    peft       the `peft` library's adapter folder (adapter_config.json + adapter_model.safetensors),
               loadable by `peft.PeftModel.from_pretrained` on the base model
    merged     the adapter folded into the base: a plain transformers checkpoint of the model's family
               (dequantized when the base was quantized)
    trainable  jft's own: the trainable leaves (trainable.safetensors) and the method's hyperparameters
               (method.json); every trained leaf, for any method
    gguf       the merged model as llama.cpp's GGUF (model.gguf: f32, f16 or q8_0, with the tokenizer)
               and an Ollama Modelfile beside it
    gguf-lora  a LoRA adapter (not merged) as llama.cpp's adapter GGUF (adapter.gguf), with a Modelfile
               that puts it over the run's base model

The output folder is written through `jft.core.files` (never into the run or over its base; a
non-empty folder needs `overwrite`; written beside and renamed in, so nothing half-written is left).
"""

from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import save_file

from jft import peft, quant, run
from jft.core import files, rules
from jft.models import gguf_write
from jft.models.hf import family_module, load_folder
from jft.models.keymap import active_keys
from jft.models.pretrained import resolve, save_pretrained
from jft.peft import peft_format
from jft.peft.lora import LoRA
from jft.quant import sparsity

FORMATS = ("peft", "merged", "trainable", "gguf", "gguf-lora")
GGUF_TYPES = gguf_write.GGUF_TYPES


def export(workdir: str, out: str, format: str, checkpoint: str = "best", overwrite: bool = False,
           gguf_type: str = "f16") -> str:
  """Write run `workdir`'s `checkpoint` ("best" or "latest") to `out` as `format`; -> `out`.
  `gguf_type` (f32, f16, q8_0) is the tensor type of the gguf formats."""
  if format not in FORMATS:
    raise peft.MethodError(f"export format {format!r}; choose one of {', '.join(FORMATS)}")
  if format.startswith("gguf"):
    gguf_write.check_type(gguf_type)
  out = files.check_output(out, overwrite=overwrite, protected=(workdir,))
  r = run.restore(workdir, checkpoint)
  config = r.model.config
  # The method's tree, not the model's view (`r.params()`): materializing drops what only the method
  # reads (VeRA's shared projections, P-tuning's encoder), and merge/export materialize themselves.
  tree = r.tree()
  name = os.path.basename(os.path.normpath(r.config.model.name))
  # refused before anything is written
  if format in ("merged", "gguf"):
    merged, _ = r.method.merge(tree)
    record = sparsity.read_record(resolve(r.config.model.name))
    if record:  # a pruned base keeps its zeros: the merged delta is masked by its pattern (`jft prune`)
      merged = sparsity.keep_zeros(merged, load_folder(resolve(r.config.model.name))[1], record)
    check_mergeable(r.method, merged, config)
  if format == "gguf":
    gguf_write.architecture(config)
    gguf_write.tokenizer_metadata(r.tokenizer, config.vocab_size)
  if format == "gguf-lora":
    adapters, alpha = lora_adapters(r.method, tree, r.config.train.init_from)
    gguf_write.lora_tensors(config, adapters)

  def write(folder):
    if format == "peft":
      peft_format.export_peft(r.method, tree, config, folder, base_model=r.config.model.name)
    elif format in ("merged", "gguf"):
      dense = rules.unflatten({p: (quant.dequantize(v) if quant.is_quantized(v) else v)
                               for p, v in rules.flatten(merged).items()})
      if format == "merged":
        save_pretrained(r.model, dense, folder, tokenizer=r.tokenizer)
      else:
        os.makedirs(folder, exist_ok=True)
        gguf_write.write_model(os.path.join(folder, "model.gguf"), config, dense, tokenizer=r.tokenizer,
                               gguf_type=gguf_type, name=name)
        gguf_write.write_modelfile(folder, gguf_write.modelfile(r.tokenizer, "./model.gguf"))
    elif format == "gguf-lora":
      os.makedirs(folder, exist_ok=True)
      gguf_write.write_lora(os.path.join(folder, "adapter.gguf"), config, adapters, alpha, gguf_type=gguf_type,
                            name=name)
      base = os.path.abspath(resolve(r.config.model.name))
      note = None if base.endswith(".gguf") else (
          "FROM is the base's Hugging Face folder, which Ollama converts itself; a GGUF of the same base works too")
      gguf_write.write_modelfile(folder, gguf_write.modelfile(r.tokenizer, base, adapter="./adapter.gguf", note=note))
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


def lora_adapters(method, tree, init_from: str = ""):
  """-> ({module: (a, b)}, llama.cpp's alpha) of a LoRA run, for `gguf-lora`; a method llama.cpp cannot run
  as a LoRA adapter over the base model is refused by name."""
  name = "+".join(m.name for m in method.methods) if isinstance(method, peft.Compose) else method.name
  merged = "; --format gguf merges it into the model instead"
  if not isinstance(method, LoRA):
    raise peft.MethodError(f"gguf-lora writes LoRA adapters (method lora); this run's method is {name}{merged}")
  if method.dora:
    raise peft.MethodError(f"gguf-lora: {name}'s magnitude vector has no place in a llama.cpp LoRA adapter{merged}")
  if method.init_a == "pissa":
    raise peft.MethodError(f"gguf-lora: PiSSA's adapter belongs to the residual base it wrote, not to the base "
                           f"model{merged}")
  if init_from:
    raise peft.MethodError(f"gguf-lora: this run's base is run {init_from} merged, not a model file{merged}")
  flat = rules.flatten(tree)
  adapters = {m: (flat[f"{m}/{method.group}/a"], flat[f"{m}/{method.group}/b"]) for m in method.modules(tree)}
  # llama.cpp scales by alpha / rank: rsLoRA's alpha / sqrt(rank) is written as the alpha that gives it
  return adapters, method.scale * method.rank
