"""jft models -> GGUF files that llama.cpp and Ollama run: the writer side of `gguf_file.py`.

A model is written in llama.cpp's layout for its family, as its converter (`convert_hf_to_gguf.py`)
writes one: the HF-named tensors (`hf.params_to_hf`, the table checkpoints are saved with) renamed
by the `gguf` package's own name map, q/k rows permuted for llama.cpp's rope kernel where its
converter permutes them (architecture `llama`: Llama and Mistral; not `qwen2`), the hyperparameters
under the architecture's keys, and a byte-level BPE tokenizer as `tokenizer.ggml.*` metadata. A LoRA
adapter is written as llama.cpp's adapter GGUF (`<base tensor>.lora_a` / `.lora_b`, `adapter.lora.alpha`);
`modelfile` is the Ollama Modelfile beside either.

Tensor types follow the converter: `f32` everything; `f16` and `q8_0` the 2-D tensors, while
vectors (norms, biases, rope factors) and position embeddings stay float32, and a row that does not
divide into q8_0 blocks of 32 falls back to f16.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

from jft.core import errors
from jft.models import hf
from jft.models.config import ModelConfig
from jft.models.gguf_file import PERMUTED
from jft.models.keymap import TRANSPOSE, active_keys
from jft.models.layers import rope_inv_freq

GGUF_TYPES = ("f32", "f16", "q8_0")
# jft family -> llama.cpp architecture (llama.cpp runs Mistral as `llama`, as its converter writes it)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
ACTIVATIONS = {"llama": "silu", "qwen2": "silu", "gpt2": "gelu_tanh"}  # what llama.cpp computes for each


class GGUFExportError(errors.JftError, ValueError):
  """A model, tokenizer or option that has no faithful GGUF form."""


def _gguf():
  import gguf  # the package; imported here so users who never export GGUF need not load it
  return gguf


def check_type(gguf_type: str):
  if gguf_type not in GGUF_TYPES:
    raise GGUFExportError(f"--gguf-type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")


def architecture(config: ModelConfig) -> str:
  """The llama.cpp architecture a model is written as; a model llama.cpp would compute differently is refused."""
  arch = ARCHITECTURES.get(config.family)
  if arch is None:
    raise GGUFExportError(f"no GGUF layout for model family {config.family!r} (supported: "
                          f"{', '.join(sorted(ARCHITECTURES))})")
  if config.activation != ACTIVATIONS[arch]:
    raise GGUFExportError(f"llama.cpp's {arch} computes {ACTIVATIONS[arch]}; this {config.family} model uses "
                          f"{config.activation}")
  kind = config.rope_scaling_dict.get("rope_type", "default")
  if kind not in ("default", "linear", "llama3"):
    raise GGUFExportError(f"rope scaling {kind!r} has no GGUF form here (supported: default, linear, llama3)")
  return arch


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's q/k row order: each head's two rope halves interleaved (`unpermute_rope_rows` undoes it)."""
  rows = w.shape[0]
  return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _name_map(config: ModelConfig, arch: str):
  gguf = _gguf()
  kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
  return gguf.get_tensor_name_map(kind, config.num_layers)


def _gguf_name(names, hf_name: str, arch: str) -> str:
  name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
  if name is None:
    raise GGUFExportError(f"{hf_name} has no tensor in llama.cpp's {arch} layout")
  return name


def _rope_heads(config: ModelConfig, name: str) -> int | None:
  """The head count a q/k tensor's rows are permuted with (None: not permuted)."""
  gguf = _gguf()
  for tensor, heads in ((gguf.MODEL_TENSOR.ATTN_Q, config.num_heads), (gguf.MODEL_TENSOR.ATTN_K, config.num_kv_heads)):
    stem = gguf.TENSOR_NAMES[tensor].split(".")[-1]  # "attn_q"
    if name.split(".")[2:3] == [stem]:
      return heads
  return None


def model_tensors(config: ModelConfig, params) -> dict[str, np.ndarray]:
  """{GGUF name: float32 array in GGUF's (numpy) orientation}: what llama.cpp's converter writes for the model."""
  gguf = _gguf()
  arch = architecture(config)
  names = _name_map(config, arch)
  t = gguf.MODEL_TENSOR
  conv1d = {gguf.TENSOR_NAMES[k].split(".")[-1] for k in (t.ATTN_QKV, t.ATTN_OUT, t.FFN_UP, t.FFN_DOWN)}
  out = {}
  for hf_name, w in hf.params_to_hf(config, params).items():
    name = _gguf_name(names, hf_name, arch)
    w = np.asarray(w, np.float32)
    parts = name.split(".")
    if arch == "gpt2" and len(parts) == 4 and parts[2] in conv1d and parts[3] == "weight":
      w = w.T  # GPT-2's Conv1D stores (in, out); llama.cpp wants (out, in) like every other linear
    heads = _rope_heads(config, name) if arch in PERMUTED else None
    if heads is not None:
      w = permute_rope_rows(w, heads)
    out[name] = np.ascontiguousarray(w)
  output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
  if arch == "gpt2" and output not in out:  # llama.cpp's converter writes GPT-2's tied head out
    out[output] = out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"]
  if config.rope_scaling_dict.get("rope_type") == "llama3":  # llama.cpp divides each frequency by its factor
    base = rope_inv_freq(config.head_dim, config.rope_theta, {})
    scaled = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_dict)
    out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = (base / scaled).astype(np.float32)
  return out


def _encode(name: str, w: np.ndarray, gguf_type: str):
  """-> (data, raw GGML type or None) for `GGUFWriter.add_tensor`."""
  gguf = _gguf()
  kept = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + "."
  if gguf_type == "f32" or w.ndim < 2 or name.startswith(kept):
    return w.astype(np.float32), None
  block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
  if gguf_type == "q8_0" and w.shape[-1] % block == 0:
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
  return w.astype(np.float16), None


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def _write(writer, tensors: dict, gguf_type: str):
  gguf = _gguf()
  writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]))
  if gguf_type == "q8_0":
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  for name in list(tensors):  # popped as encoded: the float32 copy goes once the file's copy exists
    data, raw = _encode(name, tensors.pop(name), gguf_type)
    writer.add_tensor(name, data, raw_dtype=raw)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _hyperparameters(writer, config: ModelConfig, arch: str):
  writer.add_block_count(config.num_layers)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_vocab_size(config.vocab_size)
  if arch == "gpt2":
    writer.add_context_length(config.max_position_embeddings)
    writer.add_layer_norm_eps(config.norm_eps)
    return
  # llama.cpp runs Mistral's sliding window as full attention: within the window they are the same model
  context = min(config.max_position_embeddings, config.sliding_window or config.max_position_embeddings)
  writer.add_context_length(context)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.norm_eps)
  scaling = config.rope_scaling_dict
  if scaling.get("rope_type") == "linear":
    writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(scaling["factor"]))


def write_model(path: str, config: ModelConfig, params, tokenizer=None, gguf_type: str = "f16",
                name: str = "jft") -> str:
  """Write a dense model (`params` as the model runs them, no method leaves) as a llama.cpp GGUF file."""
  gguf = _gguf()
  check_type(gguf_type)
  arch = architecture(config)
  metadata = tokenizer_metadata(tokenizer, config.vocab_size) if tokenizer is not None else None
  tensors = model_tensors(config, params)
  writer = gguf.GGUFWriter(path, arch)
  writer.add_type(gguf.GGUFType.MODEL)
  writer.add_name(name)
  _hyperparameters(writer, config, arch)
  if metadata is not None:
    _add_tokenizer(writer, metadata)
  _write(writer, tensors, gguf_type)
  return path


# ----------------------------------------------------------------------------------------------- LoRA


def lora_tensors(config: ModelConfig, adapters: dict) -> dict[str, np.ndarray]:
  """LoRA pairs by jft module path (`{"layers/self_attn/q_proj": (a [L, in, r], b [L, r, out])}`) ->
  {"blk.N.attn_q.weight.lora_a": (r, in), ...lora_b: (out, r)}: llama.cpp's orientation (its `a` has the
  base tensor's row length, its `b` the base's row count), `b`'s rows permuted as the base's q/k rows are."""
  arch = architecture(config)
  if arch == "gpt2":
    raise GGUFExportError("gguf-lora: llama.cpp's GPT-2 fuses q/k/v into one tensor; export --format gguf (merged)")
  names = _name_map(config, arch)
  keys = {k.path[: -len("/kernel")]: k for k in active_keys(hf.family_module(config.family).KEYS, config)
          if k.path.endswith("/kernel") and k.convert == TRANSPOSE}
  out = {}
  for module, (a, b) in sorted(adapters.items()):
    if module not in keys:
      raise GGUFExportError(f"gguf-lora: {module} is not a linear layer of the {config.family} layout "
                            f"(those with one: {', '.join(sorted(keys))})")
    if module == "lm_head" and config.tie_word_embeddings:
      raise GGUFExportError("gguf-lora: the model ties its output to the embeddings, so llama.cpp has no output "
                            "tensor for the lm_head adapter; export --format gguf (merged)")
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    key = keys[module]
    layers = range(config.num_layers) if key.per_layer else [None]
    for i in layers:
      base = _gguf_name(names, key.hf.format(i=i), arch)
      la, lb = (a[i], b[i]) if i is not None else (a, b)
      lb = lb.T
      heads = _rope_heads(config, base) if arch in PERMUTED else None
      if heads is not None:
        lb = permute_rope_rows(lb, heads)
      out[base + ".lora_a"] = np.ascontiguousarray(la.T)
      out[base + ".lora_b"] = np.ascontiguousarray(lb)
  return out


def write_lora(path: str, config: ModelConfig, adapters: dict, alpha: float, gguf_type: str = "f16",
               name: str = "jft") -> str:
  """Write LoRA pairs (see `lora_tensors`) as a llama.cpp LoRA adapter; llama.cpp scales by alpha / rank."""
  gguf = _gguf()
  check_type(gguf_type)
  tensors = lora_tensors(config, adapters)
  writer = gguf.GGUFWriter(path, architecture(config))
  writer.add_type(gguf.GGUFType.ADAPTER)
  writer.add_name(name)
  writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
  writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
  _write(writer, tensors, gguf_type)
  return path


# ------------------------------------------------------------------------------------------- tokenizer


def _pre_tokenizers(backend: dict) -> list[dict]:
  pre = backend.get("pre_tokenizer") or {}
  return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else ([pre] if pre else [])


def _known_splits() -> dict[str, str]:
  """Split regex -> llama.cpp pre-tokenizer name, from transformers' table of the names it reads back."""
  try:
    from transformers.integrations.gguf import gguf_tokenizer_mapping
  except ImportError:
    return {}
  splits = getattr(gguf_tokenizer_mapping, "GGUF_PRE_TOKENIZER_SPLITS", {})
  out = {}
  for name, regex in splits.items():
    out.setdefault(regex, name)
  return out


def pre_tokenizer_name(backend: dict) -> str:
  """llama.cpp's `tokenizer.ggml.pre` for how this tokenizer splits text before BPE.

    ByteLevel (GPT-2's regex)                        gpt-2
    Digits (each digit alone), ByteLevel (regex)     smollm
    Split(<regex>), ByteLevel (no regex of its own)  the name llama.cpp gives that regex (llama3, qwen2...)
  """
  parts = _pre_tokenizers(backend)
  kinds = [p.get("type") for p in parts]
  if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
    return "gpt-2"
  if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
    return "smollm"
  if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
    regex = (parts[0].get("pattern") or {}).get("Regex")
    if regex in _known_splits():
      return _known_splits()[regex]
  warnings.warn(f"GGUF export: llama.cpp has no pre-tokenizer known to match {json.dumps(parts)[:200]}; writing "
                "'default' (llama.cpp may split text differently from the tokenizer jft trained with)")
  return "default"


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
  """The `tokenizer.ggml.*` metadata of a byte-level BPE tokenizer (as llama.cpp's converter writes it):
  one token per model row (rows past the tokenizer are `[PAD<i>]`), special added tokens CONTROL, other
  added ones USER_DEFINED, the merges, the special ids, whether encoding adds BOS/EOS, the chat template."""
  gguf = _gguf()
  backend_tokenizer = getattr(tokenizer, "backend_tokenizer", None)
  if backend_tokenizer is None:
    raise GGUFExportError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
  backend = json.loads(backend_tokenizer.to_str())
  model = backend.get("model") or {}
  kinds = [p.get("type") for p in _pre_tokenizers(backend)]
  if model.get("type") != "BPE" or "ByteLevel" not in kinds:
    raise GGUFExportError(f"GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model gpt2); this one is "
                          f"{model.get('type')} with pre-tokenizers {kinds}")
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  if not merges:  # llama.cpp refuses a gpt2 vocabulary without its merges key, and GGUF arrays cannot be empty
    raise GGUFExportError("the tokenizer has no BPE merges: llama.cpp's byte-level BPE (tokenizer.ggml.model gpt2) "
                          "needs tokenizer.ggml.merges, and a GGUF array cannot be empty")
  vocab = tokenizer.get_vocab()
  if max(vocab.values()) >= vocab_size:
    raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())}, past the model's {vocab_size} "
                          "embedding rows")
  by_id = {i: t for t, i in vocab.items()}
  added = tokenizer.added_tokens_decoder
  tokens, types = [], []
  for i in range(vocab_size):
    if i in added:
      tokens.append(added[i].content)
      types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    elif i in by_id:
      tokens.append(by_id[i])
      types.append(gguf.TokenType.NORMAL)
    else:
      tokens.append(f"[PAD{i}]")
      types.append(gguf.TokenType.USER_DEFINED)
  sample = "Hello world"
  plain = tokenizer(sample, add_special_tokens=False)["input_ids"]
  full = tokenizer(sample, add_special_tokens=True)["input_ids"]
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
  return {
      "model": "gpt2", "pre": pre_tokenizer_name(backend), "tokens": tokens,
      "token_types": [int(t) for t in types], "merges": merges,
      "bos_token_id": bos, "eos_token_id": eos, "unknown_token_id": tokenizer.unk_token_id,
      "padding_token_id": tokenizer.pad_token_id,
      "add_bos_token": bool(bos is not None and len(full) > len(plain) and full[0] == bos),
      "add_eos_token": bool(eos is not None and len(full) > len(plain) and full[-1] == eos),
      "chat_template": template,
  }


def _add_tokenizer(writer, m: dict):
  writer.add_tokenizer_model(m["model"])
  writer.add_tokenizer_pre(m["pre"])
  writer.add_token_list(m["tokens"])
  writer.add_token_types(m["token_types"])
  writer.add_token_merges(m["merges"])
  for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                   ("unknown_token_id", writer.add_unk_token_id), ("padding_token_id", writer.add_pad_token_id)):
    if m[key] is not None:
      add(int(m[key]))
  writer.add_add_bos_token(m["add_bos_token"])
  writer.add_add_eos_token(m["add_eos_token"])
  if m["chat_template"]:
    writer.add_chat_template(m["chat_template"])


# -------------------------------------------------------------------------------------------- Ollama

# Ollama's Go template for ChatML (the form of Ollama's own ChatML templates: the system text, then every
# other turn, then the assistant's open turn).
CHATML_TEMPLATE = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                   '{{- range .Messages }}{{- if ne .Role "system" }}'
                   '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{- end }}'
                   '<|im_start|>assistant\n')


def _turn(role: str, text: str) -> str:
  return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def chatml_system(tokenizer):
  """-> (True, the system text the template adds when a chat has none, or None) when the tokenizer's chat
  template renders ChatML; (False, None) otherwise. Judged by rendering, not by reading the Jinja."""
  if not isinstance(getattr(tokenizer, "chat_template", None), str):
    return False, None
  render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  chat = [("system", "S1"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")]
  try:
    full = render([{"role": r, "content": c} for r, c in chat])
    alone = render([{"role": "user", "content": "U1"}])
  except Exception:  # a template that refuses these roles is not ChatML
    return False, None
  opening = "<|im_start|>assistant\n"
  if full != "".join(_turn(r, c) for r, c in chat) + opening:
    return False, None
  tail = _turn("user", "U1") + opening
  if alone == tail:
    return True, None
  head = "<|im_start|>system\n"
  if alone.startswith(head) and alone.endswith("<|im_end|>\n" + tail):
    return True, alone[len(head): -len("<|im_end|>\n" + tail)]
  return False, None


def _quoted(text: str) -> str:
  return '"""' + text + '"""'


def modelfile(tokenizer, source: str, adapter: str | None = None, note: str | None = None) -> str:
  """An Ollama Modelfile: FROM the model (and ADAPTER), the chat template in Go when it is ChatML, the
  default system text, and the end-of-turn token as a stop."""
  lines = [f"# {note}"] if note else []
  lines.append(f"FROM {source}")
  if adapter:
    lines.append(f"ADAPTER {adapter}")
  is_chatml, system = chatml_system(tokenizer)
  if is_chatml and '"""' not in (system or ""):
    lines.append(f"TEMPLATE {_quoted(CHATML_TEMPLATE)}")
    if system:
      lines.append(f"SYSTEM {_quoted(system)}")
  elif isinstance(getattr(tokenizer, "chat_template", None), str):
    lines.append("# TEMPLATE not translated: the tokenizer's chat template is not ChatML; it is in the GGUF "
                 "(tokenizer.chat_template) for llama.cpp, write its Go form for Ollama by hand")
  else:
    lines.append("# no TEMPLATE: the tokenizer has no chat template")
  eos = getattr(tokenizer, "eos_token", None)
  if eos:
    lines.append(f"PARAMETER stop {json.dumps(eos)}")
  return "\n".join(lines) + "\n"


def write_modelfile(folder: str, text: str) -> str:
  path = os.path.join(folder, "Modelfile")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path
