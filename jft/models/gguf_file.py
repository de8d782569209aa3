"""GGUF files (llama.cpp) -> HF-named float tensors -> the usual HF loader.

A GGUF file is read with the `gguf` package, every tensor dequantized to
float32, renamed to its HF name by one table, and the q/k row permutation
that llama.cpp's converter applies for its rope kernel is undone. From there
the Llama key table in `llama.py` does the rest, exactly as for a folder.
"""

from __future__ import annotations

import re

import numpy as np

from jft.core import errors
from jft.models import hf, llama

# GGUF tensor name -> HF tensor name (Llama layout).
GGUF_TO_HF = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
)
# Tensors llama.cpp writes that carry no weights of ours (precomputed rope factors).
GGUF_IGNORED = (r"rope_freqs\.weight",)
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes (not qwen2's)


def _hf_name(name: str, path: str) -> str | None:
  for pattern, target in GGUF_TO_HF:
    if re.fullmatch(pattern, name):
      return re.sub(pattern, target, name)
  if any(re.fullmatch(p, name) for p in GGUF_IGNORED):
    return None
  raise errors.UnexpectedTensorError(f"{path}: unexpected GGUF tensor {name!r}")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (it interleaves the two rope halves of each head)."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, path, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is not None:
      return default
    raise errors.MissingTensorError(f"{path}: GGUF metadata key {key!r} is missing")
  return field.contents()


def hf_config_from_gguf(reader, path: str) -> dict:
  arch = _field(reader, "general.architecture", path)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise errors.UnknownArchitectureError(
        f"{path}: unknown GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  tensors = {t.name for t in reader.tensors}
  heads = int(_field(reader, f"{arch}.attention.head_count", path))
  hidden = int(_field(reader, f"{arch}.embedding_length", path))
  vocab = reader.fields.get(f"{arch}.vocab_size")
  vocab = int(vocab.contents()) if vocab is not None else len(_field(reader, "tokenizer.ggml.tokens", path))
  opt = lambda key: reader.fields[key].contents() if key in reader.fields else None
  return {
      "model_type": arch,
      "attention_bias": "blk.0.attn_q.bias" in tensors,  # Llama's attention_bias (Qwen2's q/k/v biases are implied)
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length", path)),
      "num_hidden_layers": int(_field(reader, f"{arch}.block_count", path)),
      "num_attention_heads": heads,
      "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", path, heads)),
      "head_dim": int(_field(reader, f"{arch}.rope.dimension_count", path, hidden // heads)),
      "max_position_embeddings": int(_field(reader, f"{arch}.context_length", path, 2048)),
      "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
      "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", path, 10000.0)),
      "tie_word_embeddings": "output.weight" not in tensors,
      "bos_token_id": opt("tokenizer.ggml.bos_token_id"),
      "eos_token_id": opt("tokenizer.ggml.eos_token_id"),
      "pad_token_id": opt("tokenizer.ggml.padding_token_id"),
  }


def load_gguf(path: str, dtype):
  """Read a GGUF file -> (ModelConfig, params)."""
  import gguf  # the package; imported here so HF-folder users need not touch it

  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # truncated or malformed files fail inside the reader
    raise errors.CorruptCheckpointError(f"{path}: not a readable GGUF file ({e})") from e
  hf_config = hf_config_from_gguf(reader, path)
  config = llama.config_from_hf(hf_config)
  by_hf = {}
  for tensor in reader.tensors:
    name = _hf_name(tensor.name, path)
    if name is not None:
      by_hf[name] = tensor

  def read(name):
    tensor = by_hf[name]
    try:
      w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
      w = w.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    except Exception as e:
      raise errors.CorruptCheckpointError(f"{path}: cannot dequantize tensor {tensor.name!r} ({e})") from e
    if hf_config["model_type"] in PERMUTED and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
      w = unpermute_rope_rows(w, config.num_heads if ".q_proj." in name else config.num_kv_heads)
    return w

  return config, hf.params_from_hf(config, {n: path for n in by_hf}, read, dtype)


def load_tokenizer(path: str):
  """The tokenizer a GGUF file describes, without torch.

  transformers builds it from the file's `tokenizer.*` metadata, but its GGUF
  reader imports torch; jft reads the metadata with the `gguf` package and hands
  it to the same builder (`convert_gguf_tokenizer`), so the result is the
  tokenizer `AutoTokenizer.from_pretrained(..., gguf_file=...)` gives.
  """
  import gguf
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                      convert_gguf_tokenizer)
  from transformers.tokenization_utils_tokenizers import TokenizersBackend

  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:
    raise errors.CorruptCheckpointError(f"{path}: not a readable GGUF file ({e})") from e
  metadata = {k: f.contents() for k, f in reader.fields.items()
              if k.startswith("tokenizer.") or k == "general.architecture"}
  groups = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                    if f"tokenizer.{key}" in metadata}
            for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
  if tokenizer_dict.get("tokenizer_type") == "llama":  # sentencepiece vocabularies add BOS unless told
    tokenizer_config.setdefault("add_bos_token", True)
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
  backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
  return TokenizersBackend(tokenizer_object=backend, **tokenizer_config, **extra)
