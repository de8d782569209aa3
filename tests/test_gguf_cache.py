"""A GGUF file is decoded once: later loads read `gguf_cache`'s folders, keyed by the file's bytes."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from test_gguf_export import bpe_tokenizer

import jft
from jft.core import rules
from jft.models import gguf_cache, gguf_file, gguf_write, pretrained

TEXT = "Héllo, wörld! 2024\n<|im_start|>user\nhi there<|im_end|>\n"


@pytest.fixture
def gguf_path(byte_model, tmp_path, monkeypatch):
  """A tiny Llama with a real BPE tokenizer as a GGUF file, and a cache folder of its own."""
  monkeypatch.setenv("JFT_CACHE_DIR", str(tmp_path / "cache"))
  model, params = jft.load_pretrained(byte_model)
  tokenizer = bpe_tokenizer()
  config = dataclasses.replace(model.config, vocab_size=len(tokenizer))
  return gguf_write.write_model(str(tmp_path / "tiny.gguf"), config, _resized(params, config), tokenizer=tokenizer, gguf_type="f32")


def _resized(params, config):
  """The byte model's weights with the embedding cut or tiled to the BPE vocabulary."""
  flat = {k: np.asarray(v) for k, v in rules.flatten(params).items()}
  for k, v in flat.items():
    if v.ndim == 2 and v.shape[0] != config.vocab_size and "embed" in k:
      flat[k] = np.resize(v, (config.vocab_size, v.shape[1]))
  return rules.unflatten(flat)


def _decodes(monkeypatch):
  """Count the real GGUF decodes (weights, tokenizer) from here on."""
  calls = {"weights": 0, "tokenizer": 0}
  load_gguf, load_tokenizer = gguf_file.load_gguf, gguf_file.load_tokenizer

  def weights(*a, **k):
    calls["weights"] += 1
    return load_gguf(*a, **k)

  def tokenizer(*a, **k):
    calls["tokenizer"] += 1
    return load_tokenizer(*a, **k)

  monkeypatch.setattr(gguf_file, "load_gguf", weights)
  monkeypatch.setattr(gguf_file, "load_tokenizer", tokenizer)
  return calls


def test_the_second_load_reads_the_cache_and_gives_the_same_model_and_tokenizer(gguf_path, monkeypatch):
  calls = _decodes(monkeypatch)
  model1, params1 = pretrained.load_pretrained(gguf_path)
  tokenizer1 = pretrained.load_tokenizer(gguf_path)
  model2, params2 = pretrained.load_pretrained(gguf_path)
  tokenizer2 = pretrained.load_tokenizer(gguf_path)
  assert calls == {"weights": 1, "tokenizer": 1}  # the second of each came from the cache
  assert model1.config == model2.config
  flat1, flat2 = rules.flatten(params1), rules.flatten(params2)
  assert set(flat1) == set(flat2)
  for k in flat1:
    np.testing.assert_array_equal(np.asarray(flat1[k]), np.asarray(flat2[k]), err_msg=k)
  assert tokenizer1.encode(TEXT) == tokenizer2.encode(TEXT)
  assert tokenizer1.chat_template == tokenizer2.chat_template
  assert (tokenizer1.eos_token, tokenizer1.pad_token) == (tokenizer2.eos_token, tokenizer2.pad_token)


def test_a_changed_file_is_decoded_again(gguf_path, monkeypatch):
  pretrained.load_pretrained(gguf_path)
  calls = _decodes(monkeypatch)
  with open(gguf_path, "r+b") as f:  # one byte of the last tensor's data: same size, other contents
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
    f.seek(-1, os.SEEK_END)
    f.write(bytes([last[0] ^ 1]))
  os.utime(gguf_path, ns=(1, 1))
  pretrained.load_pretrained(gguf_path)
  assert calls["weights"] == 1
  assert len(os.listdir(os.path.join(os.environ["JFT_CACHE_DIR"], "gguf"))) == 2


def test_cache_off_writes_nothing_and_an_unwritable_cache_still_loads(gguf_path, monkeypatch, tmp_path):
  monkeypatch.setenv("JFT_CACHE_DIR", "off")
  assert gguf_cache.entry(gguf_path, "weights") is None
  pretrained.load_pretrained(gguf_path)
  assert not os.path.exists(tmp_path / "cache")
  blocked = tmp_path / "blocked"
  blocked.write_text("a file where the cache folder would go")
  monkeypatch.setenv("JFT_CACHE_DIR", str(blocked))
  model, params = pretrained.load_pretrained(gguf_path)  # the store fails quietly; the model is still returned
  assert model.config.vocab_size == 512 and not os.path.isdir(blocked)


def test_jft_commands_keep_compiled_programs_in_the_cache(tmp_path):
  code = ("import os, sys; from jft import cli; cli._compilation_cache(); "
          "print(os.environ.get('JAX_COMPILATION_CACHE_DIR'))")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  out = subprocess.run([sys.executable, "-c", code], env={**env, "JFT_CACHE_DIR": str(tmp_path)},
                       capture_output=True, text=True, check=True).stdout.strip()
  assert out == str(tmp_path / "xla")
  out = subprocess.run([sys.executable, "-c", code], env={**env, "JFT_CACHE_DIR": "off"},
                       capture_output=True, text=True, check=True).stdout.strip()
  assert out == "None"
