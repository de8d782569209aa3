"""Adapters in the `peft` library's folder format, both ways.

A folder holds `adapter_config.json` and `adapter_model.safetensors` with
exactly the names and torch layouts peft writes, e.g.

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
    prompt_embeddings                                                 (n, d)

Each method says what it writes (`Method.peft_config`, `peft_export`,
`peft_import`, or per-module `peft_tensors`); this module does the rest
once: module names from the model family's HF key table (`keymap`, the same
table checkpoints load with), one tensor per layer for layer-stacked
leaves, the folder, and named errors for missing, extra or misshapen tensors.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jft.core import errors, rules
from jft.models.config import ModelConfig
from jft.models.hf import family_module
from jft.models.keymap import TRANSPOSE, active_keys
from jft.peft import api

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class PeftFormatError(errors.JftError, ValueError):
  pass


def _module_names(config: ModelConfig) -> dict[str, str]:
  """jft linear module path -> HF module name template (with {i} per layer)."""
  out = {}
  for key in active_keys(family_module(config.family).KEYS, config):
    if key.path.endswith("/kernel") and key.convert == TRANSPOSE and key.hf.endswith(".weight"):
      out[key.path[: -len("/kernel")]] = key.hf[: -len(".weight")]
  return out


def _hf_module(config, module: str) -> str:
  names = _module_names(config)
  if module not in names:
    raise PeftFormatError(f"{module} has no single HF module in the {config.family} layout "
                          f"(peft-format export supports: {', '.join(sorted(names))})")
  return names[module]


class PeftIO:
  """The tensors of one peft folder as a method sees them: by jft module path and peft suffix."""

  def __init__(self, config: ModelConfig, tensors: dict | None = None, where: str = ""):
    self.config, self.tensors, self.where = config, tensors if tensors is not None else {}, where

  def _names(self, module: str, suffix: str) -> list[str]:
    """One tensor name, or one per layer when the HF module is per layer (`{i}`)."""
    template = _hf_module(self.config, module)
    if "{i}" not in template:
      return [PREFIX + template + suffix]
    return [PREFIX + template.format(i=i) + suffix for i in range(self.config.num_layers)]

  def put(self, module: str, suffix: str, value, transpose: bool = False):
    """Write a (possibly layer-stacked) leaf of `module` as one tensor per layer."""
    value = np.asarray(value)
    value = np.swapaxes(value, -1, -2) if transpose else value
    names = self._names(module, suffix)
    self.tensors.update(zip(names, value) if "{i}" in _hf_module(self.config, module) else [(names[0], value)])

  def put_global(self, name: str, value):
    self.tensors[name] = np.asarray(value)

  def take(self, module: str, suffix: str, like, transpose: bool = False):
    """Read `module`'s tensors for a leaf shaped `like` (stacking layers back)."""
    arrays = [self._pop(name) for name in self._names(module, suffix)]
    value = np.stack(arrays) if "{i}" in _hf_module(self.config, module) else arrays[0]
    value = np.swapaxes(value, -1, -2) if transpose else value
    _check_shape(f"{module}{suffix}", value, like, self.where)
    return value

  def take_global(self, name: str):
    return self._pop(name)

  def _pop(self, name: str):
    if name not in self.tensors:
      raise errors.MissingTensorError(f"{self.where}: missing {name!r}")
    return self.tensors.pop(name)


def _check_shape(what, value, like, where):
  if tuple(np.shape(value)) != tuple(like.shape):
    raise errors.ShapeMismatchError(f"{where}: {what} has shape {np.shape(value)}, expected {tuple(like.shape)}")


def _adapter_and_modules(method: api.Method) -> tuple[api.Method, list]:
  """The one method peft calls the adapter, and the parts it saves as whole modules (`modules_to_save`)."""
  parts = method.methods if isinstance(method, api.Compose) else (method,)
  modules = [m for m in parts if m.peft_module]
  adapters = [m for m in parts if not m.peft_module]
  if len(adapters) == 1:
    return adapters[0], modules
  raise PeftFormatError(f"method {method.name!r}: a peft folder holds one adapter, this has "
                        f"{[m.name for m in adapters]}")


def export_peft(method: api.Method, params, config: ModelConfig, folder: str, base_model: str = "") -> str:
  """Write `method`'s adapter from `params` as a peft folder (a reward head as `modules_to_save`).

  `params` is the method's tree as `init` made it (a restored run's `tree()`), not the model's
  materialized view, which lacks what only the method reads (VeRA's shared pair)."""
  adapter, modules = _adapter_and_modules(method)
  if adapter.peft_type is None:
    raise PeftFormatError(f"method {adapter.name!r} has no peft equivalent (those with one: "
                          f"{', '.join(sorted(n for n, c in api.METHODS.items() if c.peft_type))})")
  io = PeftIO(config)
  for part in (adapter, *modules):
    part.peft_export(params, io)
  cfg = {"peft_type": adapter.peft_type, "task_type": "SEQ_CLS" if modules else "CAUSAL_LM", "inference_mode": True,
         "base_model_name_or_path": base_model, "modules_to_save": [m.peft_module for m in modules] or None,
         **adapter.peft_config(params)}
  os.makedirs(folder, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in io.tensors.items()},
            os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(folder, CONFIG), "w") as f:
    json.dump(cfg, f, indent=2)
  return folder


def _saved_modules(cfg: dict, tensors: dict) -> list:
  """The whole-module parts (`modules_to_save`) a folder holds tensors for: a reward head."""
  parts = []
  for cls in api.METHODS.values():
    if cls.peft_module and cls.peft_module in (cfg.get("modules_to_save") or ()):
      weight = tensors.get(f"{PREFIX}{cls.peft_module}.weight")
      if weight is not None:
        parts.append(cls(outputs=weight.shape[0]))
  return parts


def _method_class(cfg: dict, path: str) -> type:
  """The method that reads this peft type (the class defining `from_peft_config`)."""
  kind = cfg.get("peft_type")
  readers = {c.peft_type: c for c in api.METHODS.values() if c.peft_type and "from_peft_config" in c.__dict__}
  if kind not in readers:
    raise PeftFormatError(f"{path}: peft_type={kind!r} is not supported ({', '.join(sorted(readers))})")
  return readers[kind]


def import_peft(folder: str, params, config: ModelConfig):
  """Read a peft folder onto base `params` -> (method, params with the adapter)."""
  cfg_path, weights_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
  for p in (cfg_path, weights_path):
    if not os.path.isfile(p):
      raise errors.CheckpointNotFoundError(f"{p}: missing (a peft adapter folder has {CONFIG} and {WEIGHTS})")
  with open(cfg_path) as f:
    cfg = json.load(f)
  try:
    method = _method_class(cfg, cfg_path).from_peft_config(cfg)
  except api.MethodError as e:
    raise PeftFormatError(f"{cfg_path}: {e}") from None
  try:
    tensors = load_file(weights_path)
  except Exception as e:
    raise errors.CorruptCheckpointError(f"{weights_path}: not a readable safetensors file ({e})") from e
  # peft strips the adapter name on save; tolerate ".default" from older files.
  tensors = {re.sub(r"\.default(?=\.|$)", "", k): v for k, v in tensors.items()}
  modules = _saved_modules(cfg, tensors)
  if modules:
    method = api.Compose((method, *modules))
  adapted = method.init(jax.random.PRNGKey(0), params)  # structure + constants (scale)
  io = PeftIO(config, tensors, weights_path)
  values = {}
  for part in method.methods if modules else (method,):
    values.update(part.peft_import(adapted, io))
  if io.tensors:
    raise errors.UnexpectedTensorError(f"{weights_path}: unexpected tensor(s) {sorted(io.tensors)[:5]}")
  flat = rules.flatten(adapted)
  for path, value in values.items():
    _check_shape(path, value, flat[path], weights_path)
    flat[path] = jnp.asarray(value, jnp.float32)
  return method, rules.unflatten(flat)
