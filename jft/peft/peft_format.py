"""Adapters in the `peft` library's folder format, both ways.

A folder holds `adapter_config.json` and `adapter_model.safetensors` with
exactly the names and torch layouts peft writes, e.g.

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (out, r)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  (out,)   DoRA
    base_model.model.model.layers.0.self_attn.k_proj.ia3_l           (out, 1) / (1, in) feed-forward
    prompt_embeddings                                                 (n, d) prompt / (n, L*2*kvd) prefix

Module names come from the model family's HF key table (`keymap`), the same
table checkpoints load with, so nothing here spells a model's layout twice.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jft import errors, rules
from jft.models.config import ModelConfig
from jft.models.hf import family_module
from jft.models.keymap import TRANSPOSE, active_keys
from jft.peft import api
from jft.peft.ia3 import IA3
from jft.peft.lora import DoRA, LoRA
from jft.peft.prefix import Prefix, kv_from_flat, prefix_flat
from jft.peft.prompt import PromptTuning, PTuning

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


def _per_layer(config, module, leaf_value, fn):
  """{HF tensor name: array} for a (possibly layer-stacked) leaf."""
  template = _hf_module(config, module)
  if "{i}" not in template:
    return {PREFIX + template + fn[0]: fn[1](np.asarray(leaf_value))}
  return {PREFIX + template.format(i=i) + fn[0]: fn[1](np.asarray(leaf_value[i]))
          for i in range(config.num_layers)}


def _lora_config(method: LoRA, modules, base):
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": method.rank, "lora_alpha": method.alpha,
          "lora_dropout": method.dropout, "use_rslora": method.rslora, "use_dora": method.dora,
          "target_modules": sorted({m.rsplit("/", 1)[-1] for m in modules}), "bias": "none",
          "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
          "base_model_name_or_path": base, "modules_to_save": None, "layers_to_transform": None,
          "rank_pattern": {}, "alpha_pattern": {}}


def export_peft(method: api.Method, params, config: ModelConfig, folder: str, base_model: str = "") -> str:
  """Write `method`'s adapter from `params` as a peft folder."""
  flat = rules.flatten(params)
  tensors: dict[str, np.ndarray] = {}
  if isinstance(method, LoRA):
    modules = sorted(p[: -len("/lora_a")] for p in flat if p.endswith("/lora_a"))
    for m in modules:
      tensors.update(_per_layer(config, m, flat[m + "/lora_a"], (".lora_A.weight", lambda a: a.T)))
      tensors.update(_per_layer(config, m, flat[m + "/lora_b"], (".lora_B.weight", lambda b: b.T)))
      if method.dora:
        tensors.update(_per_layer(config, m, flat[m + "/lora_magnitude"], (".lora_magnitude_vector", lambda x: x)))
    cfg = _lora_config(method, modules, base_model)
  elif isinstance(method, IA3):
    cfg_modules, ff = [], []
    for path in sorted(p for p in flat if p.endswith(("/ia3_in", "/ia3_out"))):
      module, leaf = path.rsplit("/", 1)
      shape = (lambda v: v[None, :]) if leaf == "ia3_in" else (lambda v: v[:, None])
      tensors.update(_per_layer(config, module, flat[path], (".ia3_l", shape)))
      cfg_modules.append(module.rsplit("/", 1)[-1])
      if leaf == "ia3_in":
        ff.append(module.rsplit("/", 1)[-1])
    cfg = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": sorted(set(cfg_modules)),
           "feedforward_modules": sorted(set(ff)), "fan_in_fan_out": False, "init_ia3_weights": True,
           "inference_mode": True, "base_model_name_or_path": base_model, "modules_to_save": None}
  elif isinstance(method, (PromptTuning, PTuning)):
    prompt = method.materialize(params)["prompt_embeddings"]  # P-tuning saves its encoder's output
    tensors["prompt_embeddings"] = np.asarray(prompt, np.float32)
    cfg = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": prompt.shape[0],
           "token_dim": config.hidden_size, "num_transformer_submodules": 1,
           "num_attention_heads": config.num_heads, "num_layers": config.num_layers,
           "prompt_tuning_init": "RANDOM", "inference_mode": True, "base_model_name_or_path": base_model}
  elif isinstance(method, Prefix):
    prefix = np.asarray(prefix_flat(method.materialize(params)), np.float32)
    tensors["prompt_embeddings"] = prefix
    kvd = config.num_kv_heads * config.head_dim
    cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": prefix.shape[0],
           "token_dim": kvd, "num_transformer_submodules": 1, "num_attention_heads": config.num_kv_heads,
           "num_layers": config.num_layers, "encoder_hidden_size": method.encoder_hidden,
           "prefix_projection": False, "inference_mode": True, "base_model_name_or_path": base_model}
  else:
    raise PeftFormatError(f"method {method.name!r} has no peft file format (supported: lora, dora, ia3, "
                          "prompt, ptuning, prefix)")
  os.makedirs(folder, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(folder, CONFIG), "w") as f:
    json.dump(cfg, f, indent=2)
  return folder


def _method_from_config(cfg: dict, path: str) -> api.Method:
  kind = cfg.get("peft_type")
  if kind == "LORA":
    targets = cfg["target_modules"]
    if isinstance(targets, str):
      targets = [targets]  # peft: a string is a full-match regex on module names
    for field in ("layers_to_transform", "rank_pattern", "alpha_pattern"):
      if cfg.get(field):
        raise PeftFormatError(f"{path}: {field}={cfg[field]!r} is not supported")
    cls = DoRA if cfg.get("use_dora") else LoRA
    return cls(targets=tuple(targets), rank=cfg["r"], alpha=cfg["lora_alpha"],
               dropout=cfg.get("lora_dropout", 0.0), rslora=cfg.get("use_rslora", False))
  if kind == "IA3":
    return IA3(targets=tuple(cfg["target_modules"]), feedforward=tuple(cfg.get("feedforward_modules") or ()))
  if kind == "PROMPT_TUNING":
    return PromptTuning(num_virtual_tokens=cfg["num_virtual_tokens"], init_from="random")
  if kind == "PREFIX_TUNING":
    return Prefix(num_virtual_tokens=cfg["num_virtual_tokens"])
  raise PeftFormatError(f"{path}: peft_type={kind!r} is not supported (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING)")


def import_peft(folder: str, params, config: ModelConfig):
  """Read a peft folder onto base `params` -> (method, params with the adapter)."""
  cfg_path, weights_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
  for p in (cfg_path, weights_path):
    if not os.path.isfile(p):
      raise errors.CheckpointNotFoundError(f"{p}: missing (a peft adapter folder has {CONFIG} and {WEIGHTS})")
  with open(cfg_path) as f:
    cfg = json.load(f)
  method = _method_from_config(cfg, cfg_path)
  try:
    tensors = load_file(weights_path)
  except Exception as e:
    raise errors.CorruptCheckpointError(f"{weights_path}: not a readable safetensors file ({e})") from e
  # peft strips the adapter name on save; tolerate ".default" from older files.
  tensors = {re.sub(r"\.default(?=\.|$)", "", k): v for k, v in tensors.items()}

  if isinstance(method, (PromptTuning, Prefix)):
    value = tensors.pop("prompt_embeddings")
    if isinstance(method, PromptTuning):
      shaped = {"prompt_embeddings": value}
    else:
      pk, pv = kv_from_flat(jnp.asarray(value), config.num_layers, config.num_kv_heads * config.head_dim)
      shaped = {"layers/self_attn/prefix_k": pk, "layers/self_attn/prefix_v": pv}
    adapted = method.init(jax.random.PRNGKey(0), params)
    return method, _overwrite(adapted, shaped, tensors, weights_path)

  adapted = method.init(jax.random.PRNGKey(0), params)  # structure + constants (scale)
  flat = rules.flatten(adapted)
  layouts = {"lora_a": (".lora_A.weight", lambda t: t.T), "lora_b": (".lora_B.weight", lambda t: t.T),
             "lora_magnitude": (".lora_magnitude_vector", lambda t: t),
             "ia3_out": (".ia3_l", lambda t: t[:, 0]), "ia3_in": (".ia3_l", lambda t: t[0, :])}
  shaped = {}
  for path in [p for p in flat if p.rsplit("/", 1)[-1] in layouts]:
    module, leaf = path.rsplit("/", 1)
    suffix, to_jft = layouts[leaf]
    names = _per_layer(config, module, flat[path], (suffix, lambda v: v))
    arrays = []
    for name in names:
      if name not in tensors:
        raise errors.MissingTensorError(f"{weights_path}: missing {name!r} for {path}")
      arrays.append(to_jft(tensors.pop(name)))
    value = np.stack(arrays) if "{i}" in _hf_module(config, module) else arrays[0]
    shaped[path] = value
  return method, _overwrite(adapted, shaped, tensors, weights_path)


def _overwrite(adapted, shaped, leftover, where):
  if leftover:
    raise errors.UnexpectedTensorError(f"{where}: unexpected tensor(s) {sorted(leftover)[:5]}")
  flat = rules.flatten(adapted)
  for path, value in shaped.items():
    if tuple(flat[path].shape) != tuple(np.shape(value)):
      raise errors.ShapeMismatchError(f"{where}: {path} has shape {np.shape(value)}, "
                                      f"expected {tuple(flat[path].shape)}")
    flat[path] = jnp.asarray(value, jnp.float32)
  return rules.unflatten(flat)
