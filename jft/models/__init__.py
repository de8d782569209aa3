"""Flax models (Llama family, GPT-2) and their checkpoint loaders."""

from jft.models.config import ModelConfig
from jft.models.pretrained import EMBEDDED, load_pretrained, load_tokenizer, save_pretrained, save_quantized
from jft.models.token_ids import TokenIdError, check_ids
from jft.models.transformer import Transformer, init_cache

# The compute dtypes a model runs in, by the names configs and the CLI use (`model.dtype`, `--dtype`;
# `jnp.dtype(name)` is the dtype).
COMPUTE_DTYPES = ("float32", "bfloat16")
