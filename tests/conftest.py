"""Shared fixtures: tiny random Hugging Face checkpoints built with torch."""


import os
import shutil
import tempfile

import numpy as np
import pytest

# One persistent XLA compilation cache for the whole run: set here, before any JAX import, it is
# inherited by the xdist workers and by the `jft` subprocesses the tests start, many of which
# compile the same tiny train step. XLA keys each entry by the computation, the compile options
# and the versions, so a hit is the executable a fresh compile would give (the default suite:
# 15:47 -> 13:57 on 2 cores together with compiling each mesh case once).
# jft's own cache (GGUF files decoded once, `jft.models.gguf_cache`) the same way: one per test run, so the
# embedded SmolLM2 is decoded once for all the tests that load it, and no run sees another's entries.
_OWN = []
for _env, _prefix in (("JAX_COMPILATION_CACHE_DIR", "jft-tests-xla-"), ("JFT_CACHE_DIR", "jft-tests-cache-")):
  if _env not in os.environ:
    os.environ[_env] = tempfile.mkdtemp(prefix=_prefix)
    _OWN.append(os.environ[_env])


def pytest_unconfigure(config):
  for folder in _OWN:
    shutil.rmtree(folder, ignore_errors=True)


TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

# family name -> (transformers config class name, kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", TINY),
    "llama_tied_head_dim": ("LlamaConfig", {**TINY, "tie_word_embeddings": True, "head_dim": 16}),
    "llama3_rope_untied": ("LlamaConfig", {**TINY, "tie_word_embeddings": False, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, "rope_theta": 500000.0}),
    "llama_mqa": ("LlamaConfig", {**TINY, "num_key_value_heads": 1}),
    "mistral_window": ("MistralConfig", {**TINY, "sliding_window": 4}),
    "qwen2": ("Qwen2Config", {**TINY, "tie_word_embeddings": True}),
    "gpt2": ("GPT2Config", dict(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}


def build_hf_model(family: str, folder: str, seed: int = 0):
  """Save a tiny random transformers model of `family` to `folder`; return it (eval mode)."""
  import torch
  import transformers

  cls_name, kwargs = FAMILIES[family]
  config = getattr(transformers, cls_name)(**kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():  # random norms/biases too, so a wrong mapping cannot hide behind ones/zeros
    for name, p in model.named_parameters():
      if "norm" in name or "ln_" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="session")
def smollm2():
  """(model, params) of the embedded SmolLM2-135M, loaded once per session (tests must not donate them)."""
  import jft

  return jft.load_pretrained("smollm2-135m")


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
  """family -> (folder, torch model), built once per session."""
  cache = {}

  def get(family):
    if family not in cache:
      folder = str(tmp_path_factory.mktemp(family))
      cache[family] = (folder, build_hf_model(family, folder))
    return cache[family]

  return get


def padded_batch(vocab: int, length: int = 12, seed: int = 0):
  """Three rows: full, left-padded by 3, right-padded by 4."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, (3, length)).astype(np.int64)
  mask = np.ones((3, length), np.int64)
  mask[1, :3] = 0
  mask[2, -4:] = 0
  return ids, mask


def torch_logits(model, ids, mask):
  """transformers' logits with positions that skip padding (as its `generate` passes them)."""
  import torch

  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  """Folder of a random 2-layer Llama with SmolLM2's tokenizer (the chat template and vocab are real):
  the model of `configs/tiny.py` runs (`--config.model.name=<folder>`)."""
  import torch
  import transformers

  import jft

  folder = str(tmp_path_factory.mktemp("tiny_llama"))
  config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=True)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
  jft.load_tokenizer("smollm2-135m").save_pretrained(folder)
  return folder


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
  """A byte-level tokenizer (one token per byte, eos <|im_end|>, a ChatML template): no hub, tiny vocab."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                      additional_special_tokens=["<|im_start|>"])
  tokenizer.chat_template = CHATML
  return tokenizer


@pytest.fixture(scope="session")
def shardable_model(tmp_path_factory):
  """Folder of a random 2-layer Llama whose split dimensions divide by 2, with SmolLM2's tokenizer: runs of
  `jft train` on meshes of simulated devices and on several processes."""
  import jax
  import jax.numpy as jnp

  import jft

  config = jft.ModelConfig(family="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                           tie_word_embeddings=True)
  model = jft.Transformer(config)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
  folder = str(tmp_path_factory.mktemp("shardable_llama"))
  return jft.save_pretrained(model, params, folder, tokenizer=jft.load_tokenizer("smollm2-135m"))


@pytest.fixture(scope="session")
def byte_model(tmp_path_factory):
  """Folder of a random 2-layer Llama over `byte_tokenizer`'s 258 tokens (saved beside it): fast runs of
  every objective, where sampling sees every token often (GRPO can find a rewarded one). Weights drawn
  with std 0.2, not 0.02: tied embeddings that small bound every logit near 0, so no adapter could make
  a token likely."""
  import torch
  import transformers

  folder = str(tmp_path_factory.mktemp("byte_llama"))
  tokenizer = byte_tokenizer()
  config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                    bos_token_id=None)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  return folder
