"""KV-cache decoding against full recomputation and transformers' generate."""

import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.models.generate import GenerationError, Sampling, generate, sample_token


def naive_greedy(model, params, prompt, steps):
  """Recompute the whole sequence every step (no cache): slow, obviously right.

  The sequence sits right-padded in a fixed buffer so one compilation serves every step;
  causal attention makes the padding after it irrelevant.
  """
  import jax

  forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
  buf = np.zeros((1, len(prompt) + steps), np.int32)
  buf[0, :len(prompt)] = prompt
  for n in range(len(prompt), len(prompt) + steps):
    buf[0, n] = int(jnp.argmax(forward(params, jnp.asarray(buf))[0, n - 1]))
  return buf[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama_mqa", "mistral_window", "gpt2"])
def test_cache_decoding_equals_recomputation(family, hf_models):
  model, params = jft.load_pretrained(hf_models(family)[0])
  prompts = [[5, 17, 3, 9, 44, 2, 8], [7, 1], [12, 13, 14, 15]]  # different lengths: left padding
  out = generate(model, params, prompts, Sampling(max_new_tokens=10))
  for prompt, got in zip(prompts, out):
    assert got == naive_greedy(model, params, prompt, 10)


@pytest.mark.parametrize("family", ["llama", "mistral_window", "qwen2"])
def test_greedy_matches_transformers_generate(family, hf_models):
  import torch

  folder, hf_model = hf_models(family)
  model, params = jft.load_pretrained(folder)
  prompt = [3, 14, 15, 92, 65, 35]
  with torch.no_grad():
    ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
  assert generate(model, params, [prompt], Sampling(max_new_tokens=12))[0] == ref


def test_stop_tokens_end_each_row(hf_models):
  model, params = jft.load_pretrained(hf_models("llama")[0])
  prompts = [[5, 17, 3], [7, 1, 2, 9]]
  free = generate(model, params, prompts, Sampling(max_new_tokens=8))
  stop = free[0][2]  # the third token of row 0 becomes a stop token
  out = generate(model, params, prompts, Sampling(max_new_tokens=8), stop_tokens=[stop])
  assert out[0] == free[0][:3]
  cut = next((i + 1 for i, t in enumerate(free[1]) if t == stop), len(free[1]))
  assert out[1] == free[1][:cut]


def test_sampling_is_seeded_and_filters():
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(4, 50).astype(np.float32))
  import jax
  key = jax.random.PRNGKey(3)
  hot = Sampling(temperature=1.0)
  a, b = sample_token(logits, key, hot), sample_token(logits, key, hot)
  np.testing.assert_array_equal(a, b)
  draws = np.stack([sample_token(logits, jax.random.PRNGKey(s), hot) for s in range(20)])
  assert len(np.unique(draws)) > 4  # really samples
  greedy = jnp.argmax(logits, -1)
  np.testing.assert_array_equal(sample_token(logits, key, Sampling(temperature=1.0, top_k=1)), greedy)
  np.testing.assert_array_equal(sample_token(logits, key, Sampling(temperature=1.0, top_p=1e-6)), greedy)
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  for s in range(20):
    tok = np.asarray(sample_token(logits, jax.random.PRNGKey(s), Sampling(temperature=2.0, top_k=3)))
    assert all(t in row for t, row in zip(tok, top3))


def test_top_p_keeps_the_nucleus():
  # probs 0.5, 0.3, 0.2 (log): top_p=0.7 keeps the first two only.
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2]]))
  import jax
  seen = {int(sample_token(logits, jax.random.PRNGKey(s), Sampling(temperature=1.0, top_p=0.7))[0])
          for s in range(50)}
  assert seen == {0, 1}


def test_sampled_generation_is_reproducible(hf_models):
  model, params = jft.load_pretrained(hf_models("llama")[0])
  s = Sampling(max_new_tokens=8, temperature=1.0, top_k=20)
  a = generate(model, params, [[1, 2, 3]], s, seed=1)
  assert a == generate(model, params, [[1, 2, 3]], s, seed=1)
  assert any(generate(model, params, [[1, 2, 3]], s, seed=k) != a for k in range(2, 6))


@pytest.mark.parametrize("method_name", ["prompt", "prefix"])
def test_prompt_and_prefix_tuned_models_decode_with_the_cache(method_name, hf_models):
  """Virtual tokens (prompt tuning) and prefix keys/values decode like full recomputation."""
  import jax

  from jft import peft
  model, params = jft.load_pretrained(hf_models("llama")[0])
  method = peft.build(method_name, num_virtual_tokens=3)
  adapted = method.init(jax.random.PRNGKey(0), params)
  prompts = [[5, 17, 3, 9, 44, 2, 8], [7, 1]]  # left padding between the virtual tokens and the text
  out = generate(model, adapted, prompts, Sampling(max_new_tokens=6))
  base = generate(model, params, prompts, Sampling(max_new_tokens=6))
  assert out != base
  for prompt, got in zip(prompts, out):
    assert got == naive_greedy(model, adapted, prompt, 6)


def test_sampling_follows_the_distribution():
  import jax

  probs = np.array([0.7, 0.2, 0.1], np.float32)
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (20000, 3))
  draws = np.asarray(sample_token(logits, jax.random.PRNGKey(0), Sampling(temperature=1.0)))
  np.testing.assert_allclose(np.bincount(draws, minlength=3) / draws.size, probs, atol=0.02)


def test_out_of_vocabulary_ids_long_prompts_and_bad_settings_are_named(hf_models):
  model, params = jft.load_pretrained(hf_models("llama")[0])
  vocab, context = model.config.vocab_size, model.config.max_position_embeddings
  with pytest.raises(GenerationError, match=rf"prompt 1: token id {vocab} is outside the model's vocabulary"):
    generate(model, params, [[1, 2], [3, vocab]], Sampling(max_new_tokens=2))
  with pytest.raises(GenerationError, match=rf"{context - 2} tokens \+ 4 new tokens exceeds the model's context "
                     rf"of {context} positions; .* at most 2 new tokens"):
    generate(model, params, [[1] * (context - 2)], Sampling(max_new_tokens=4))
  with pytest.raises(GenerationError, match="non-empty prompt"):
    generate(model, params, [[]], Sampling(max_new_tokens=2))
  for settings, message in [({"max_new_tokens": 0}, "max_new_tokens=0: must be >= 1"),
                            ({"top_p": 0.0}, r"top_p=0.0: must be in \(0, 1\]"),
                            ({"temperature": -1.0}, "temperature=-1.0"), ({"top_k": -2}, "top_k=-2")]:
    with pytest.raises(GenerationError, match=message):
      Sampling(**settings)


def test_long_generation_reports_progress_in_token_chunks(hf_models, monkeypatch, capsys):
  """Decoding runs CHUNK tokens per compiled call; the bar counts tokens, and a stopped batch ends early."""
  from jft.core import progress
  from jft.models import generate as gen

  monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line per chunk
  model, params = jft.load_pretrained(hf_models("llama")[0])
  steps = 2 * gen.CHUNK + 3  # three calls, the last one partial
  prompt = [5, 17, 3, 9]
  out = generate(model, params, [prompt], Sampling(max_new_tokens=steps), progress_desc="generating (tokens)")
  assert out[0] == naive_greedy(model, params, prompt, steps)  # chunk boundaries change nothing
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("generating (tokens)")]
  total = 3 * gen.CHUNK
  assert [l.split()[2] for l in lines] == [f"{gen.CHUNK}/{total}", f"{2 * gen.CHUNK}/{total}"]
  # Stopping at the first new token: one call, no further lines.
  out = generate(model, params, [prompt], Sampling(max_new_tokens=steps), stop_tokens=[out[0][0]],
                 progress_desc="generating (tokens)")
  assert len(out[0]) == 1
  assert not [l for l in capsys.readouterr().err.splitlines() if l.startswith("generating")]
  # No description: no progress at all (the GRPO step's own sampling).
  generate(model, params, [prompt], Sampling(max_new_tokens=steps))
  assert "generating" not in capsys.readouterr().err
