"""GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, biases everywhere.

HF stores GPT-2 projections as `Conv1D`, whose weight is already `(in, out)`,
and fuses q/k/v into one `c_attn`; the table below slices it into separate
`q_proj`/`k_proj`/`v_proj` so every family exposes the same hook points.
"""

from __future__ import annotations

from jft.models.config import ModelConfig
from jft.models.keymap import TRANSPOSE, Key, Split

MODEL_TYPES = ("gpt2",)

KEYS = (
    Key("embed_tokens/embedding", "transformer.wte.weight"),
    Key("embed_positions/embedding", "transformer.wpe.weight"),
    Key("layers/input_layernorm/scale", "transformer.h.{i}.ln_1.weight"),
    Key("layers/input_layernorm/bias", "transformer.h.{i}.ln_1.bias"),
    Key("layers/self_attn/q_proj/kernel", "transformer.h.{i}.attn.c_attn.weight", Split(0, 3)),
    Key("layers/self_attn/k_proj/kernel", "transformer.h.{i}.attn.c_attn.weight", Split(1, 3)),
    Key("layers/self_attn/v_proj/kernel", "transformer.h.{i}.attn.c_attn.weight", Split(2, 3)),
    Key("layers/self_attn/q_proj/bias", "transformer.h.{i}.attn.c_attn.bias", Split(0, 3)),
    Key("layers/self_attn/k_proj/bias", "transformer.h.{i}.attn.c_attn.bias", Split(1, 3)),
    Key("layers/self_attn/v_proj/bias", "transformer.h.{i}.attn.c_attn.bias", Split(2, 3)),
    Key("layers/self_attn/o_proj/kernel", "transformer.h.{i}.attn.c_proj.weight"),
    Key("layers/self_attn/o_proj/bias", "transformer.h.{i}.attn.c_proj.bias"),
    Key("layers/post_attention_layernorm/scale", "transformer.h.{i}.ln_2.weight"),
    Key("layers/post_attention_layernorm/bias", "transformer.h.{i}.ln_2.bias"),
    Key("layers/mlp/up_proj/kernel", "transformer.h.{i}.mlp.c_fc.weight"),
    Key("layers/mlp/up_proj/bias", "transformer.h.{i}.mlp.c_fc.bias"),
    Key("layers/mlp/down_proj/kernel", "transformer.h.{i}.mlp.c_proj.weight"),
    Key("layers/mlp/down_proj/bias", "transformer.h.{i}.mlp.c_proj.bias"),
    Key("norm/scale", "transformer.ln_f.weight"),
    Key("norm/bias", "transformer.ln_f.bias"),
    Key("lm_head/kernel", "lm_head.weight", TRANSPOSE, "!tie_word_embeddings"),
)

IGNORED = (r"transformer\.h\.\d+\.attn\.(masked_)?bias",)

_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(hf: dict) -> ModelConfig:
  if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
    raise NotImplementedError("GPT-2 with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn")
  d, heads = hf["n_embd"], hf["n_head"]
  act = hf.get("activation_function", "gelu_new")
  if act not in _ACT:
    raise NotImplementedError(f"GPT-2 activation_function={act!r}")
  return ModelConfig(
      family="gpt2", vocab_size=hf["vocab_size"], hidden_size=d,
      intermediate_size=hf.get("n_inner") or 4 * d, num_layers=hf["n_layer"],
      num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
      max_position_embeddings=hf["n_positions"], norm="layer",
      norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="plain", activation=_ACT[act],
      position="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=() if hf.get("eos_token_id") is None else (hf["eos_token_id"],),
      pad_token_id=hf.get("pad_token_id"))


def config_to_hf(c: ModelConfig) -> dict:
  return {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
      "vocab_size": c.vocab_size, "n_embd": c.hidden_size, "n_inner": c.intermediate_size,
      "n_layer": c.num_layers, "n_head": c.num_heads, "n_positions": c.max_position_embeddings,
      "layer_norm_epsilon": c.norm_eps,
      "activation_function": {"gelu_tanh": "gelu_new", "gelu": "gelu"}[c.activation],
      "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
      "eos_token_id": c.eos_token_id[0] if c.eos_token_id else None, "pad_token_id": c.pad_token_id,
  }
