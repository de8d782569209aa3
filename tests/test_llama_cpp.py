"""llama.cpp itself runs jft's GGUF exports and gives jft's greedy tokens.

Slow: the first run builds llama-cpp-python from its source archive into a cached folder
(`scripts/build_llama_cpp.py`; never a dependency of jft). The run, its exports and the prompt are
`test_gguf_export`'s (a 2-layer Llama over a trained 512-token BPE, LoRA on all seven linears). Greedy
decoding here is an argmax over llama.cpp's own logits after each `eval`, so no sampler setting of
llama.cpp's (repeat penalty, min-p) can stand between the two.
"""

import os
import sys

import numpy as np
import pytest
from test_gguf_export import IDS, ROOT, bpe_model, exported, lora_run  # noqa: F401 (module fixtures)

import jft
from jft.models import generate as gen
from jft.models import gguf_write

pytestmark = pytest.mark.slow
NEW = 64


@pytest.fixture(scope="module")
def llama_cpp():
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  try:
    import build_llama_cpp
  finally:
    sys.path.pop(0)
  return build_llama_cpp.load()


def _llama_cpp_greedy(lib, model_path, prompt, lora_path=None):
  llm = lib.Llama(model_path=model_path, lora_path=lora_path, n_ctx=128, n_batch=128, n_threads=2, seed=0,
                  logits_all=True, verbose=False)  # without logits_all, `eval` keeps no logits (its sampler reads them)
  llm.eval(list(prompt))
  tokens = []
  for _ in range(NEW):
    tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    llm.eval([tokens[-1]])
  llm.close()
  return tokens


def _jft_greedy(model, params, prompt):
  return gen.generate(model, params, [list(prompt)], gen.Sampling(NEW))[0]


@pytest.fixture(scope="module")
def adapted_tokens(lora_run):
  _, r, _ = lora_run
  return _jft_greedy(r.model, r.params(), IDS[0].tolist())


def test_llama_cpp_gives_jfts_greedy_tokens_on_the_f32_gguf(llama_cpp, exported, adapted_tokens):
  got = _llama_cpp_greedy(llama_cpp, os.path.join(exported("gguf", "f32"), "model.gguf"), IDS[0].tolist())
  assert len(adapted_tokens) == NEW and len(set(adapted_tokens)) > 4  # a real continuation, not one repeated token
  assert got == adapted_tokens


def test_llama_cpp_on_the_f16_gguf_agrees_on_most_tokens(llama_cpp, exported, adapted_tokens):
  got = _llama_cpp_greedy(llama_cpp, os.path.join(exported("gguf", "f16"), "model.gguf"), IDS[0].tolist())
  agree = np.mean(np.asarray(got) == np.asarray(adapted_tokens))
  assert agree >= 0.95, (agree, got, adapted_tokens)


def test_llama_cpp_with_the_lora_gguf_gives_the_adapted_models_tokens(llama_cpp, lora_run, exported, bpe_model,
                                                                      adapted_tokens, tmp_path):
  _, r, _ = lora_run
  base = jft.load_pretrained(bpe_model)[1]
  base_path = gguf_write.write_model(str(tmp_path / "base.gguf"), r.model.config, base, tokenizer=r.tokenizer,
                                   gguf_type="f32")
  plain = _llama_cpp_greedy(llama_cpp, base_path, IDS[0].tolist())
  assert plain == _jft_greedy(r.model, r.params(r.init.trainable), IDS[0].tolist())  # the base alone (B = 0)
  assert plain != adapted_tokens  # the adapter changes the continuation, so the next check can fail
  adapter = os.path.join(exported("gguf-lora", "f32"), "adapter.gguf")
  assert _llama_cpp_greedy(llama_cpp, base_path, IDS[0].tolist(), lora_path=adapter) == adapted_tokens
