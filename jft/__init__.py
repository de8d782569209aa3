"""jft: performance-efficient fine-tuning of LLMs in JAX/Flax."""

import os

# transformers' tokenizers and configs are all jft uses of it: its "PyTorch was not found" advice is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from jft.models import (ModelConfig, Transformer, load_pretrained, load_tokenizer, save_pretrained,
                        save_quantized)

__version__ = "0.1.0"
