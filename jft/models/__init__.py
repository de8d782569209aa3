"""Flax models (Llama family, GPT-2) and their checkpoint loaders.

Layer 2 (imports quant/, data/ and core/; never names the methods: a method
reaches a model only through `hooks.Settings`, which the model reads).

    config.py, layers.py, transformer.py   the architecture (one Transformer for every family)
    llama.py, gpt2.py, keymap.py           each family's HF config and weight names
    hf.py, gguf_file.py, pretrained.py     loading and saving HF folders and GGUF files
    head.py                                the output head: next-token loss and log-probs, fused with
                                           the projection so no [B, T, vocab] logits are formed
    generate.py                            sampling with a KV cache
    hooks.py                               the extension points methods configure
"""

from jft.models.config import ModelConfig
from jft.models.pretrained import EMBEDDED, load_pretrained, load_tokenizer, save_pretrained, save_quantized
from jft.data.token_ids import TokenIdError, check_ids
from jft.models.transformer import Transformer, init_cache

# The compute dtypes a model runs in, by the names configs and the CLI use (`model.dtype`, `--dtype`;
# `jnp.dtype(name)` is the dtype).
COMPUTE_DTYPES = ("float32", "bfloat16")
