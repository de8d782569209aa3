"""The embedded SmolLM2-135M-Instruct GGUF against transformers reading the same file."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.models.generate import Sampling, encode_prompts, generate
from jft.models.pretrained import resolve

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def smol(smollm2):
  import torch
  import transformers

  path = resolve("smollm2-135m")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  model, params = smollm2
  return model, params, jft.load_tokenizer("smollm2-135m"), hf_model


def test_config_from_gguf(smol):
  c = smol[0].config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
  assert c.tie_word_embeddings and c.rope_theta == 1e5 and c.vocab_size == 49152


def test_logits_match_transformers_gguf(smol):
  import torch

  model, params, tok, hf_model = smol
  enc = tok(PROMPTS, return_tensors="np", padding=True, padding_side="left")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(positions)).logits.numpy()
  out = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  err = np.abs(out - ref)[mask.astype(bool)].max()
  assert err <= 1e-3, err


def test_greedy_20_tokens_match_transformers(smol):
  import torch

  model, params, tok, hf_model = smol
  prompts = encode_prompts(tok, ["What is the capital of France?", "Name three colors."])
  ours = generate(model, params, prompts, Sampling(max_new_tokens=20))
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      # An explicit mask: the pad id (2, <|im_end|>) also occurs inside chat prompts, and
      # transformers would otherwise infer a mask that hides those tokens.
      ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=20, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_token_id)
    assert got == ref[0, len(prompt):].tolist()
  assert "Paris" in tok.decode(ours[0])


@pytest.mark.slow  # the greedy test above already decodes "Paris" in-process; this adds the CLI path
def test_cli_generate_mentions_paris():
  out = subprocess.run([sys.executable, "-m", "jft.cli", "generate", "--model", "smollm2-135m",
                        "--prompt", "What is the capital of France?", "--max-new-tokens", "24"],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert "Paris" in out.stdout


def test_tokenizer_without_torch_equals_transformers():
  """jft reads the GGUF tokenizer itself (transformers' GGUF reader needs torch, the demo has none)."""
  from transformers import AutoTokenizer

  path = resolve("smollm2-135m")
  ours = jft.load_tokenizer("smollm2-135m")
  ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  for text in ["Hello world!", "  spaces\n\ttabs and émojis 🙂", "<|im_start|>user\nhi<|im_end|>", *PROMPTS]:
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
  chat = [{"role": "user", "content": "Hi there"}]
  assert (ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
          == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
  assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (ref.eos_token_id, ref.pad_token_id,
                                                                       ref.bos_token_id)
