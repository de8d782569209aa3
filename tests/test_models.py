"""Flax models against transformers' own logits, on padded batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, padded_batch, torch_logits

import jft
from jft.models.transformer import Transformer


def jft_logits(model, params, ids, mask):
  return np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, hf_models):
  folder, hf_model = hf_models(family)
  model, params = jft.load_pretrained(folder)
  ids, mask = padded_batch(model.config.vocab_size)
  ref = torch_logits(hf_model, ids, mask)
  out = jft_logits(model, params, ids, mask)
  real = mask.astype(bool)
  assert out.shape == ref.shape
  assert np.abs(out - ref)[real].max() <= 1e-4


def test_config_details_are_read(hf_models):
  cfg = jft.load_pretrained(hf_models("mistral_window")[0])[0].config
  assert cfg.sliding_window == 4 and cfg.family == "mistral"
  cfg = jft.load_pretrained(hf_models("llama_tied_head_dim")[0])[0].config
  assert cfg.head_dim == 16 and cfg.tie_word_embeddings
  cfg = jft.load_pretrained(hf_models("llama3_rope_untied")[0])[0].config
  assert dict(cfg.rope_scaling)["rope_type"] == "llama3" and not cfg.tie_word_embeddings
  assert jft.load_pretrained(hf_models("qwen2")[0])[0].config.qkv_bias


def test_sliding_window_matters(hf_models):
  """The Mistral window (4) is shorter than the sequence (12): dropping it must change logits."""
  folder, _ = hf_models("mistral_window")
  model, params = jft.load_pretrained(folder)
  ids, mask = padded_batch(model.config.vocab_size)
  unwindowed = Transformer(model.config.replace(sliding_window=None))
  diff = np.abs(jft_logits(model, params, ids, mask) - jft_logits(unwindowed, params, ids, mask))
  assert diff[0, :4].max() < 1e-6 and diff[0, 5:].max() > 1e-3  # row 0 has no padding


def test_scan_layers_and_remat(hf_models):
  folder, _ = hf_models("llama")
  model, params = jft.load_pretrained(folder)
  # Layers are stacked by nn.scan: one leading layer axis on every block leaf.
  leaves = jax.tree_util.tree_leaves_with_path(params["layers"])
  assert all(leaf.shape[0] == model.config.num_layers for _, leaf in leaves)
  ids, mask = padded_batch(model.config.vocab_size)
  remat = Transformer(model.config, remat="full")
  np.testing.assert_allclose(jft_logits(remat, params, ids, mask), jft_logits(model, params, ids, mask),
                             atol=1e-6)

  def loss(p, m):
    return m.apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).mean()

  g1 = jax.grad(loss)(params, model)
  g2 = jax.grad(loss)(params, remat)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_bfloat16(hf_models):
  folder, hf_model = hf_models("llama")
  model, params = jft.load_pretrained(folder, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  ids, mask = padded_batch(model.config.vocab_size)
  out = jft_logits(model, params, ids, mask)
  ref = torch_logits(hf_model, ids, mask)
  assert out.dtype == np.float32
  assert np.abs(out - ref)[mask.astype(bool)].max() < 0.1  # bf16 rounding, not a mapping error


def test_fp32_params_bf16_compute(hf_models):
  folder, hf_model = hf_models("llama")
  model, params = jft.load_pretrained(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  ids, mask = padded_batch(model.config.vocab_size)
  assert np.abs(jft_logits(model, params, ids, mask) - torch_logits(hf_model, ids, mask))[
      mask.astype(bool)].max() < 0.1
