"""jft: performance-efficient fine-tuning of LLMs in JAX/Flax."""

from jft.models import (ModelConfig, Transformer, load_pretrained, load_tokenizer, save_pretrained,
                        save_quantized)

__version__ = "0.1.0"
