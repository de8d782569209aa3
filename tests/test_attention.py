"""Attention implementations (`model.attention`), remat policies (`model.remat`, offload included) and bf16
compute with float32 master weights, all on CPU: the Pallas kernel runs in interpret mode, the cuDNN call's
arguments go through `jax.nn.dot_product_attention`'s XLA implementation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.config import schema
from jft.core import rules
from jft.models import attention, head, transformer
from jft.models.layers import Settings
from jft.models.transformer import Transformer, attention_mask_4d

B, T, KV, GROUPS, D = 2, 11, 2, 2, 8
# Row 0: left padding by 3; row 1: two packed examples, then right padding by 2.
SEGMENTS = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0]])


def _inputs(prefix: int, t: int = T, seed: int = 0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return normal(B, t, KV, GROUPS, D), normal(B, prefix + T, KV, D), normal(B, prefix + T, KV, D), normal(
      B, t, KV, GROUPS, D)


def _sees_a_key(mask):
  return mask.any(-1)[:, :, None, None, None]  # rows that see no key are padding: their output is never read


def _assert_same_forward_and_gradients(ref, other, q, k, v, cotangent, mask):
  cotangent = cotangent * _sees_a_key(mask)

  @jax.jit
  def run(q, k, v):
    (out_ref, vjp_ref), (out, vjp) = jax.vjp(ref, q, k, v), jax.vjp(other, q, k, v)
    return out_ref, vjp_ref(cotangent), out, vjp(cotangent)

  out_ref, grads_ref, out, grads = run(q, k, v)
  np.testing.assert_allclose(out * _sees_a_key(mask), out_ref * _sees_a_key(mask), atol=1e-5)
  for name, got, want in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"d{name}")


def test_pallas_equals_xla_forward_and_gradients():
  """Causal, grouped-query (2 query heads per key head), left padding, packed segments, a sliding window of 4
  and 3 prefix keys visible to every query, over 3 query blocks x 4 key blocks (lengths not multiples of them)."""
  n = 3
  q, k, v, cotangent = _inputs(n)
  mask = attention_mask_4d(jnp.asarray(SEGMENTS), jnp.arange(T), 4)
  mask = jnp.concatenate([jnp.ones((B, T, n), bool), mask], axis=2)
  _assert_same_forward_and_gradients(
      lambda q, k, v: attention.xla_attention(q, k, v, mask, jnp.float32, causal=True),
      lambda q, k, v: attention.pallas_attention(q, k, v, mask, causal=True, block_q=4, block_k=4),
      q, k, v, cotangent, mask)


def test_pallas_equals_xla_with_a_kv_cache():
  """Decoding: 3 new queries written at index 5 of an 11-slot cache (no causal block skipping)."""
  q, k, v, _ = _inputs(0, t=3, seed=1)
  mask = attention_mask_4d(jnp.asarray(SEGMENTS), 5 + jnp.arange(3), None)
  want = attention.xla_attention(q, k, v, mask, jnp.float32, causal=False)
  got = jax.jit(lambda *a: attention.pallas_attention(*a, mask, causal=False, block_q=2, block_k=4))(q, k, v)
  np.testing.assert_allclose(got * _sees_a_key(mask), want * _sees_a_key(mask), atol=1e-5)


def test_the_cudnn_call_means_what_the_mask_says():
  """The arguments the cudnn implementation passes (mask as bias, is_causal where it matches the mask) give the
  xla path's result through `jax.nn.dot_product_attention`'s own XLA implementation; with prefix keys too."""
  for n in (0, 3):
    q, k, v, cotangent = _inputs(n, seed=2)
    mask = attention_mask_4d(jnp.asarray(SEGMENTS), jnp.arange(T), None)
    mask = jnp.concatenate([jnp.ones((B, T, n), bool), mask], axis=2)
    _assert_same_forward_and_gradients(
        lambda q, k, v: attention.xla_attention(q, k, v, mask, jnp.float32, causal=True),
        lambda q, k, v: attention.dot_product_attention(q, k, v, mask, jnp.float32, causal=True,
                                                        implementation="xla"),
        q, k, v, cotangent, mask)


def test_the_choice(monkeypatch):
  pick = lambda name, dtype=jnp.bfloat16, cached=False, d=64, t=128: attention.resolve(
      name, dtype=dtype, head_dim=d, t=t, s=t, cached=cached)
  assert pick("auto") == "xla" and pick("pallas") == "pallas" and pick("xla") == "xla"  # this CPU
  with pytest.raises(attention.AttentionError, match=r"model.attention=cudnn needs a CUDA GPU .*this backend is cpu"):
    pick("cudnn")
  with pytest.raises(attention.AttentionError, match=r"model.attention='flash'; expected one of auto, xla, cudnn"):
    pick("flash")
  monkeypatch.setattr(attention, "_is_cuda", lambda: True)  # what auto would pick on a CUDA GPU
  assert pick("auto") == "cudnn" and pick("cudnn") == "cudnn"
  assert pick("auto", dtype=jnp.float32) == "xla" and pick("auto", cached=True) == "xla"
  assert pick("auto", d=160) == "xla" and pick("auto", t=127) == "xla"
  with pytest.raises(attention.AttentionError, match=r"cudnn needs model.dtype=bfloat16"):
    pick("cudnn", dtype=jnp.float32)


TINY = jft.ModelConfig(family="mistral", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=5,
                       tie_word_embeddings=True)


def _batch():
  ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 12))
  mask = np.ones((2, 12), np.int32)
  mask[0, :3] = 0  # left padding
  return jnp.asarray(ids), jnp.asarray(mask)


def _hidden_loss_and_grads(model, params, ids, mask):
  """A cheap-to-compile loss over the final hidden states of real positions (padding rows are never read)."""
  def loss(p):
    hidden = model.apply({"params": p}, ids, attention_mask=mask, return_hidden=True)
    return jnp.mean(jnp.square(hidden) * mask[..., None])
  return jax.jit(jax.value_and_grad(loss))(params)


def _loss_and_grads(model, params, ids, mask):
  """jft's next-token loss (the fused head) and its gradients."""
  def loss(p):
    apply = lambda i, m, return_hidden: model.apply({"params": p}, i, attention_mask=m, return_hidden=return_hidden)
    return head.model_loss(apply, p, ids, mask, mask)[0]
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def tiny_params():
  return jax.jit(Transformer(TINY).init)(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]


def test_a_model_with_pallas_attention_trains_like_xla(tiny_params):
  """The whole model (scanned, remat'd layers, a sliding window, left padding): loss and every gradient."""
  ids, mask = _batch()
  want = _hidden_loss_and_grads(Transformer(TINY, settings=Settings(attention="xla")), tiny_params, ids, mask)
  got = _hidden_loss_and_grads(Transformer(TINY, settings=Settings(attention="pallas")), tiny_params, ids, mask)
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got[1], want[1])


def test_every_remat_policy_gives_the_same_loss_and_gradients(tiny_params):
  """`offload` keeps the matmul outputs in pinned host memory, which this CPU backend has."""
  assert transformer.host_offload_supported()
  ids, mask = _batch()
  want = _hidden_loss_and_grads(Transformer(TINY, remat="none"), tiny_params, ids, mask)
  for name in transformer.REMAT_POLICIES:
    got = _hidden_loss_and_grads(Transformer(TINY, remat=name), tiny_params, ids, mask)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name), got[1], want[1])


def _config(folder, **model):
  config = schema.default_config()
  config.model.update(name=folder, **model)
  config.data.path = "unused.jsonl"
  return config


def test_offload_without_pinned_host_memory_is_refused_at_assembly(monkeypatch, byte_model):
  from jft.run import assemble

  monkeypatch.setattr(transformer, "host_offload_supported", lambda device=None: False)
  with pytest.raises(transformer.RematError, match=r"model.remat=offload needs pinned host memory.*use dots"):
    assemble.build_model(_config(byte_model, remat="offload"))
  with pytest.raises(transformer.RematError, match="offload"):
    Transformer(TINY, remat="offload").init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))


def test_the_config_fields():
  config = _config("smollm2-135m", attention="flash", param_dtype="float16")
  problems = " ".join(schema.problems(config))
  assert "model.attention='flash': expected one of auto, xla, cudnn, pallas" in problems
  assert "model.param_dtype='float16': expected one of '', float32, bfloat16" in problems
  assert not schema.problems(_config("smollm2-135m", attention="pallas", remat="offload", param_dtype="float32"))


def test_bf16_compute_keeps_float32_master_weights_loss_and_gradients(byte_model):
  """model.dtype=bfloat16 with model.param_dtype=float32 (full fine-tuning): the weights stay float32, the
  layers' matmuls run in bfloat16, the loss and the gradients (so the optimizer) are float32. An adapter's
  leaves are float32 over a bfloat16 base without param_dtype."""
  from jft import peft
  from jft.run import assemble

  model, base, _, _ = assemble.build_model(_config(byte_model, dtype="bfloat16", param_dtype="float32"))
  assert model.dtype == jnp.bfloat16 and {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.float32)}
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 250, (2, 10)))
  mask = jnp.ones_like(ids)
  loss, grads = _loss_and_grads(model, base, ids, mask)
  assert loss.dtype == jnp.float32 and {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  apply = lambda p: model.apply({"params": p}, ids, attention_mask=mask, return_hidden=True)
  text = str(jax.make_jaxpr(apply)(base))
  # every projection of the layers (q, k, v, o, gate, up, down; tokens on one axis) is a bfloat16 matmul
  assert len(re.findall(r"bf16\[20,\d+\] = dot_general", text)) >= 7, text
  f32_model, f32_base, _, _ = assemble.build_model(_config(byte_model))
  f32_loss, _ = _loss_and_grads(f32_model, f32_base, ids, mask)
  np.testing.assert_allclose(loss, f32_loss, rtol=2e-2)

  model, base, method, _ = assemble.build_model(_config(byte_model, dtype="bfloat16"))  # LoRA (the default)
  trainable, frozen = peft.split(method, method.init(jax.random.PRNGKey(0), base))
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
  base_leaves = {p: x for p, x in rules.flatten(frozen).items() if "/lora/" not in p}  # (lora/scale: a float32 number)
  assert len(base_leaves) == len(rules.flatten(base)) and {x.dtype for x in base_leaves.values()} == {
      jnp.dtype(jnp.bfloat16)}


def test_cudnn_asked_for_on_cpu_is_refused_before_loading(byte_model):
  from jft.run import assemble

  with pytest.raises(attention.AttentionError, match="model.attention=cudnn needs a CUDA GPU"):
    assemble.build_model(_config(byte_model, attention="cudnn", dtype="bfloat16"))

