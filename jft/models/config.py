"""One architecture description shared by every model family.

Llama, Mistral, Qwen2 and GPT-2 are the same pre-norm decoder with different
choices (norm, MLP, positions, biases, attention window). The choices live
here as plain, hashable data so a Flax module can hold the config as an
attribute and `jax.jit` can treat it as static. The family modules
(`llama.py`, `gpt2.py`) translate Hugging Face `config.json` to and from it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str  # "llama" | "mistral" | "qwen2" | "gpt2": which HF layout to read/write
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  norm: str = "rms"  # "rms" | "layer"
  norm_eps: float = 1e-6
  mlp: str = "gated"  # "gated" (SwiGLU: down(act(gate) * up)) | "plain" (down(act(up)))
  activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
  position: str = "rope"  # "rope" | "learned"
  rope_theta: float = 10000.0
  # Rope scaling as sorted (key, value) pairs so the config stays hashable;
  # e.g. (("factor", 8.0), ..., ("rope_type", "llama3")).
  rope_scaling: tuple = ()
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: Optional[int] = None
  tie_word_embeddings: bool = False
  bos_token_id: Optional[int] = None
  eos_token_id: tuple = ()
  pad_token_id: Optional[int] = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    for field, allowed in (("norm", ("rms", "layer")), ("mlp", ("gated", "plain")),
                           ("activation", ("silu", "gelu_tanh", "gelu")),
                           ("position", ("rope", "learned"))):
      if getattr(self, field) not in allowed:
        raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}; expected one of {allowed}")

  @property
  def rope_scaling_dict(self) -> dict:
    return dict(self.rope_scaling)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)
