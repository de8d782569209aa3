"""Llama family: Llama 2/3, Mistral (sliding window) and Qwen2 (q/k/v biases).

This module holds only what differs from the generic decoder in
`transformer.py`: how HF `config.json` reads into a `ModelConfig`, how it is
written back, and the HF tensor-name table.
"""

from __future__ import annotations

from jft.models.config import ModelConfig
from jft.models.keymap import COPY, TRANSPOSE, Key

MODEL_TYPES = ("llama", "mistral", "qwen2")

KEYS = (
    Key("embed_tokens/embedding", "model.embed_tokens.weight", COPY),
    Key("layers/input_layernorm/scale", "model.layers.{i}.input_layernorm.weight", COPY),
    Key("layers/self_attn/q_proj/kernel", "model.layers.{i}.self_attn.q_proj.weight", TRANSPOSE),
    Key("layers/self_attn/k_proj/kernel", "model.layers.{i}.self_attn.k_proj.weight", TRANSPOSE),
    Key("layers/self_attn/v_proj/kernel", "model.layers.{i}.self_attn.v_proj.weight", TRANSPOSE),
    Key("layers/self_attn/q_proj/bias", "model.layers.{i}.self_attn.q_proj.bias", COPY, "qkv_bias"),
    Key("layers/self_attn/k_proj/bias", "model.layers.{i}.self_attn.k_proj.bias", COPY, "qkv_bias"),
    Key("layers/self_attn/v_proj/bias", "model.layers.{i}.self_attn.v_proj.bias", COPY, "qkv_bias"),
    Key("layers/self_attn/o_proj/kernel", "model.layers.{i}.self_attn.o_proj.weight", TRANSPOSE),
    Key("layers/self_attn/o_proj/bias", "model.layers.{i}.self_attn.o_proj.bias", COPY, "o_bias"),
    Key("layers/post_attention_layernorm/scale", "model.layers.{i}.post_attention_layernorm.weight", COPY),
    Key("layers/mlp/gate_proj/kernel", "model.layers.{i}.mlp.gate_proj.weight", TRANSPOSE),
    Key("layers/mlp/up_proj/kernel", "model.layers.{i}.mlp.up_proj.weight", TRANSPOSE),
    Key("layers/mlp/down_proj/kernel", "model.layers.{i}.mlp.down_proj.weight", TRANSPOSE),
    Key("layers/mlp/gate_proj/bias", "model.layers.{i}.mlp.gate_proj.bias", COPY, "mlp_bias"),
    Key("layers/mlp/up_proj/bias", "model.layers.{i}.mlp.up_proj.bias", COPY, "mlp_bias"),
    Key("layers/mlp/down_proj/bias", "model.layers.{i}.mlp.down_proj.bias", COPY, "mlp_bias"),
    Key("norm/scale", "model.norm.weight", COPY),
    Key("lm_head/kernel", "lm_head.weight", TRANSPOSE, "!tie_word_embeddings"),
)

# Buffers some checkpoints carry that are recomputed, not loaded.
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def _rope(hf: dict):
  """(theta, scaling) from either the transformers-4 or the -5 config layout."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = {**legacy, **params}
  scaling.pop("rope_theta", None)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  scaling.pop("type", None)
  scaling["rope_type"] = kind
  return float(theta), tuple(sorted(scaling.items())) if kind != "default" else ()


def _ids(value):
  if value is None:
    return ()
  return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def config_from_hf(hf: dict) -> ModelConfig:
  model_type = hf["model_type"]
  heads = hf["num_attention_heads"]
  theta, scaling = _rope(hf)
  window = None
  if model_type == "mistral":
    window = hf.get("sliding_window")
  elif model_type == "qwen2" and hf.get("use_sliding_window"):
    raise NotImplementedError("Qwen2 with use_sliding_window=true is not supported")
  return ModelConfig(
      family=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      norm="rms",
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      mlp="gated",
      activation={"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(hf.get("hidden_act", "silu"),
                                                                         hf.get("hidden_act")),
      position="rope",
      rope_theta=theta,
      rope_scaling=scaling,
      qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
      o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
      mlp_bias=bool(hf.get("mlp_bias", False)),
      sliding_window=window,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=_ids(hf.get("eos_token_id")),
      pad_token_id=hf.get("pad_token_id"),
  )


def config_to_hf(c: ModelConfig) -> dict:
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
  rope = {"rope_theta": c.rope_theta, "rope_type": "default", **dict(c.rope_scaling)}
  hf = {
      "architectures": [arch[c.family]],
      "model_type": c.family,
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "max_position_embeddings": c.max_position_embeddings,
      "rms_norm_eps": c.norm_eps,
      "hidden_act": {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[c.activation],
      "rope_parameters": rope,
      "tie_word_embeddings": c.tie_word_embeddings,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": c.eos_token_id[0] if len(c.eos_token_id) == 1 else (list(c.eos_token_id) or None),  # id 0 too
      "pad_token_id": c.pad_token_id,
  }
  if c.family == "llama":
    hf.update(attention_bias=c.o_bias, mlp_bias=c.mlp_bias)
  if c.family == "mistral":
    hf["sliding_window"] = c.sliding_window
  return hf
