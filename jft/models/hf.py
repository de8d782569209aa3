"""Hugging Face checkpoint folders <-> (ModelConfig, params).

The conversion is driven entirely by each family's `KEYS` table
(`keymap.Key` rows), used in both directions. Expected shapes come from the
model itself (`jax.eval_shape` of its init), so a wrong tensor is reported
with its HF name, its file and both shapes before any array is built.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jft.core import errors
from jft.core.rules import flatten, unflatten
from jft.models import gpt2, llama
from jft.models.config import ModelConfig
from jft.models.keymap import Split, active_keys
from jft.models.transformer import Transformer

FAMILIES = {t: m for m in (llama, gpt2) for t in m.MODEL_TYPES}


def family_module(model_type: str, source: str = "config"):
  if model_type not in FAMILIES:
    raise errors.UnknownArchitectureError(
        f"{source}: unknown architecture model_type={model_type!r}; "
        f"supported: {', '.join(sorted(FAMILIES))}")
  return FAMILIES[model_type]


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
  model_type = hf.get("model_type")
  if model_type is None and hf.get("architectures"):
    arch = hf["architectures"][0].lower()
    model_type = next((t for t in FAMILIES if arch.startswith(t)), arch)
  family = family_module(model_type, source)
  try:
    return family.config_from_hf(hf)
  except KeyError as e:
    raise errors.CheckpointError(f"{source}: required field {e.args[0]!r} is missing") from None


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> dict:
  """Shapes and dtypes of the params a model of `config` has (no compute)."""
  model = Transformer(config, param_dtype=dtype)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  return shapes["params"]


def params_from_hf(config: ModelConfig, names: Mapping[str, str], read: Callable[[str], np.ndarray],
                   dtype=jnp.float32) -> dict:
  """Build params from HF-named tensors.

  names: HF tensor name -> the file it lives in (for error messages).
  read: HF tensor name -> numpy array in HF layout.
  """
  family = family_module(config.family)
  keys = active_keys(family.KEYS, config)
  expected = abstract_params(config, dtype)

  wanted = {}
  for key in keys:
    for i in range(config.num_layers) if key.per_layer else [None]:
      wanted.setdefault(key.hf.format(i=i), key)
  missing = sorted(set(wanted) - set(names))
  ignored = [re.compile(p) for p in family.IGNORED]
  if config.tie_word_embeddings:
    ignored.append(re.compile(r"lm_head\.weight"))
  unexpected = sorted(n for n in set(names) - set(wanted) if not any(p.fullmatch(n) for p in ignored))
  where = sorted(set(names.values())) or ["<no tensors>"]
  if missing:
    raise errors.MissingTensorError(
        f"{', '.join(where)}: {len(missing)} tensor(s) missing for a {config.family} model, "
        f"e.g. {', '.join(missing[:5])}")
  if unexpected:
    raise errors.UnexpectedTensorError(
        f"{', '.join(where)}: {len(unexpected)} unexpected tensor(s) for a {config.family} model, "
        f"e.g. {', '.join(unexpected[:5])}")

  expected = flatten(expected)
  flat = {}
  for key in keys:
    want = expected[key.path]
    layer_shape = want.shape[1:] if key.per_layer else want.shape
    arrays = []
    for i in range(config.num_layers) if key.per_layer else [None]:
      name = key.hf.format(i=i)
      array = key.to_jft(np.asarray(read(name)))
      if array.shape != tuple(layer_shape):
        raise errors.ShapeMismatchError(
            f"{names[name]}: tensor {name!r} (-> {key.path}) has shape {array.shape} after "
            f"conversion, expected {tuple(layer_shape)} from the config")
      arrays.append(array.astype(np.float32) if array.dtype.kind == "f" else array)
    value = np.stack(arrays) if key.per_layer else arrays[0]
    flat[key.path] = jnp.asarray(value, dtype)

  uncovered = sorted(set(expected) - set(flat))
  if uncovered:  # a table bug, not a user error; still say exactly what
    raise errors.MissingTensorError(f"no HF key maps to parameter(s) {uncovered}")
  return unflatten(flat)


def params_to_hf(config: ModelConfig, params: Mapping) -> dict:
  """params -> {HF name: numpy array in HF layout} (inverse of params_from_hf)."""
  keys = active_keys(family_module(config.family).KEYS, config)
  flat = flatten(params)
  out, parts = {}, {}
  for key in keys:
    value = np.asarray(flat[key.path])
    for i in range(config.num_layers) if key.per_layer else [None]:
      name = key.hf.format(i=i)
      array = key.from_jft(value[i] if key.per_layer else value)
      if isinstance(key.convert, Split):
        parts.setdefault(name, {})[key.convert.part] = array
      else:
        out[name] = array
  for name, pieces in parts.items():
    out[name] = np.concatenate([pieces[j] for j in sorted(pieces)], axis=-1)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------

def _open_safetensors(path: str):
  try:
    return safe_open(path, framework="numpy")
  except Exception as e:  # safetensors raises its own error types for bad headers/sizes
    raise errors.CorruptCheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise errors.CheckpointNotFoundError(f"{folder}: no config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise errors.CorruptCheckpointError(f"{path}: invalid JSON ({e})") from e


def load_folder(folder: str, dtype=jnp.float32):
  """Read an HF folder -> (ModelConfig, params)."""
  config = config_from_hf(read_config(folder), os.path.join(folder, "config.json"))
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(folder, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise errors.CheckpointNotFoundError(
        f"{folder}: no model.safetensors or model.safetensors.index.json "
        "(only safetensors checkpoints are supported)")
  handles, names = {}, {}
  for file in files:
    path = os.path.join(folder, file)
    if not os.path.isfile(path):
      raise errors.CheckpointNotFoundError(f"{index}: lists shard {file}, which does not exist")
    handles[file] = _open_safetensors(path)
    for name in handles[file].keys():
      names[name] = path

  def read(name):
    file = os.path.basename(names[name])
    try:
      return handles[file].get_tensor(name)
    except Exception as e:
      raise errors.CorruptCheckpointError(f"{names[name]}: cannot read tensor {name!r} ({e})") from e

  return config, params_from_hf(config, names, read, dtype)


def save_folder(config: ModelConfig, params: Mapping, folder: str, tokenizer=None,
                dtype: str = "float32"):
  """Write config.json + model.safetensors (+ tokenizer files) loadable by transformers."""
  os.makedirs(folder, exist_ok=True)
  hf = family_module(config.family).config_to_hf(config)
  hf["dtype"] = dtype
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}[dtype]
  tensors = {k: v.astype(np_dtype) for k, v in params_to_hf(config, params).items()}
  save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)
