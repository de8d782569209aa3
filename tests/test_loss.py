"""The training loss: the fused output projection + cross-entropy equals transformers' loss and the loss
from logits (value and gradients, tied and untied heads, frozen and trained), and it never forms the logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jft
from jft.models import head as losses
from jft import peft
from jft.run.memory import step_memory
from jft.run.step import make_loss_fn


def _unfused(monkeypatch):
  monkeypatch.setattr(losses, "output_head", lambda params: None)


def _counted(monkeypatch, *names) -> dict:
  """name -> a list that grows by one each time `head.<name>` is called (traced), for each name."""
  calls = {}
  for name in names:
    calls[name], original = [], getattr(losses, name)
    monkeypatch.setattr(losses, name, lambda *a, _f=original, _c=calls[name], **k: _c.append(1) or _f(*a, **k))
  return calls


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("trains_head", [False, True])
def test_fused_head_loss_equals_the_loss_from_logits(tied, trains_head, monkeypatch):
  b, t, d, vocab = 3, 13, 8, 50  # 13 positions in chunks of 3: the last chunk is padded
  monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * b * vocab * 3)
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(k[0], (b, t, d))
  w = jax.random.normal(k[1], (vocab, d) if tied else (d, vocab))
  ids = jax.random.randint(k[2], (b, t), 0, vocab)
  mask = (jax.random.uniform(k[3], (b, t)) > 0.3).astype(jnp.int32)
  tree = lambda w: {"embed_tokens": {"embedding": w}} if tied else {"lm_head": {"kernel": w}}
  head = losses.output_head(tree(w))
  assert head == losses.Head("embed_tokens/embedding" if tied else "lm_head/kernel", tied)

  def from_logits(x, w):
    return losses.next_token_loss(jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", x, w), ids, mask)[0]

  def fused(x, w):
    return losses.head_loss(x, tree(w), head, ids, mask, trains_head)[0]

  want, (gx, gw) = jax.value_and_grad(from_logits, argnums=(0, 1))(x, w)
  got, (fx, fw) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(fx, gx, atol=1e-6)
  if trains_head:
    np.testing.assert_allclose(fw, gw, atol=1e-6)
  else:
    assert not np.any(fw)  # a frozen head costs no weight gradient


def _count_chunks(monkeypatch) -> list:
  """A list that grows by one each time a chunk of the fused head really runs (not when it is skipped)."""
  ran, chunk = [], losses._chunk

  def counted(*args):
    jax.debug.callback(lambda: ran.append(1))  # inside the branch `lax.cond` takes, so only when it runs
    return chunk(*args)

  monkeypatch.setattr(losses, "_chunk", counted)
  return ran


def _skipping_case(tied, monkeypatch, key):
  """(chunk counter, x [3, 13, 8], head weight, ids) with the head in chunks of 3 positions."""
  b, t, d, vocab, c = 3, 13, 8, 50, 3
  monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * b * vocab * c)
  k = jax.random.split(key, 3)
  w = jax.random.normal(k[1], (vocab, d) if tied else (d, vocab))
  return _count_chunks(monkeypatch), jax.random.normal(k[0], (b, t, d)), w, jax.random.randint(k[2], (b, t), 0, vocab)


@pytest.mark.parametrize("tied", [False, True])
def test_the_head_runs_only_where_the_loss_mask_asks(tied, monkeypatch):
  """SFT prompts, padding and a classification label: positions that carry loss go first in every row and the
  chunks left without any are skipped, with the value and gradients of the loss from logits."""
  b, t = 3, 13
  ran, x, w, ids = _skipping_case(tied, monkeypatch, jax.random.PRNGKey(3))
  mask = np.zeros((b, t), np.int32)
  mask[0, 6:11] = 1  # prompt, response, padding
  mask[2, [4, 12]] = 1  # scattered label tokens; row 1 carries no loss
  tree = lambda w: {"embed_tokens": {"embedding": w}} if tied else {"lm_head": {"kernel": w}}
  head = losses.output_head(tree(w))
  from_logits = lambda x, w: losses.next_token_loss(
      jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", x, w), ids, mask)[0]
  fused = lambda x, w: losses.head_loss(x, tree(w), head, ids, mask, True)[0]
  want, (gx, gw) = jax.value_and_grad(from_logits, argnums=(0, 1))(x, w)
  got, (fx, fw) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(x, w)
  jax.effects_barrier()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(fx, gx, atol=1e-6)
  np.testing.assert_allclose(fw, gw, atol=1e-6)
  # Shifted targets: row 0 predicts 5 tokens, row 2 one (position 12 predicts nothing), so 2 of 5 chunks run.
  assert len(ran) == 2, ran


@pytest.mark.parametrize("tied", [False, True])
def test_fused_token_logps_equal_the_logits_path_and_skip_the_prompts(tied, monkeypatch):
  """`head_logps` = `losses.logps_of_logits` of the logits, and its input gradient under per-token cotangents
  (what DPO and GRPO put on each token); chunks holding only prompt and padding never run."""
  b, t = 3, 13
  ran, x, w, ids = _skipping_case(tied, monkeypatch, jax.random.PRNGKey(4))
  k = jax.random.split(jax.random.PRNGKey(4), 4)
  completion = np.zeros((b, t), np.int32)
  completion[0, 7:11] = completion[1, 9:13] = 1  # prompts, completions, padding; row 2 has no completion
  cotangent = jax.random.normal(k[3], (b, t))
  tree = lambda w: {"embed_tokens": {"embedding": w}} if tied else {"lm_head": {"kernel": w}}
  head = losses.output_head(tree(w))
  from_logits = lambda x: losses.logps_of_logits(
      jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", x, w), ids, completion)
  want, pullback = jax.vjp(from_logits, x)
  got, fused_pullback = jax.jit(lambda x, g: (lambda out, f: (out, f(g)))(
      *jax.vjp(lambda x: losses.head_logps(x, tree(w), head, ids, completion), x)))(x, cotangent)
  jax.effects_barrier()
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(np.asarray(got)[completion == 0] == 0) and np.all(np.asarray(got)[completion == 1] < 0)
  np.testing.assert_allclose(fused_pullback[0], pullback(cotangent)[0], atol=1e-5)
  assert len(ran) == 2, ran  # 4 scored positions per row (the shift moves them left), in chunks of 3


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])  # untied; tied (slow:
# the tied head's value and gradients are also checked against the logits path in the first test)
def test_training_loss_equals_transformers(family, hf_models, monkeypatch):
  import torch

  folder, hf = hf_models(family)
  model, params = jft.load_pretrained(folder)
  ids = np.random.RandomState(0).randint(0, 101, (2, 12))
  mask = np.ones_like(ids)
  mask[1, -5:] = 0  # right padding: transformers' positions agree without help
  labels = torch.tensor(np.where(mask == 1, ids, -100))
  with torch.no_grad():
    want = float(hf(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=labels).loss)
  method = peft.Full()
  trainable, frozen = peft.split(method, method.init(jax.random.PRNGKey(0), params))
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
  loss_fn = make_loss_fn(model, method)
  calls = _counted(monkeypatch, "head_loss", "next_token_loss")
  got, grads = jax.value_and_grad(lambda t: loss_fn(t, frozen, batch, jax.random.PRNGKey(0))[0])(trainable)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert (len(calls["head_loss"]), len(calls["next_token_loss"])) == (1, 0), calls  # the fused head ran
  _unfused(monkeypatch)
  plain, plain_grads = jax.value_and_grad(lambda t: loss_fn(t, frozen, batch, jax.random.PRNGKey(0))[0])(trainable)
  assert (len(calls["head_loss"]), len(calls["next_token_loss"])) == (1, 1), calls  # then the logits path
  np.testing.assert_allclose(float(plain), float(got), rtol=1e-6)
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(g, p, atol=1e-6)


def test_the_step_never_forms_the_logits(monkeypatch):
  config = jft.ModelConfig(family="llama", vocab_size=8192, hidden_size=32, intermediate_size=48, num_layers=1,
                           num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
  model = jft.Transformer(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  method, tx, batch, length = peft.LoRA(), optax.adamw(1e-3), 8, 128
  monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 2**20)  # chunks of 1/8 of the logits
  fused = step_memory(model, method, params, tx, batch, length)["temporaries"]
  _unfused(monkeypatch)
  plain = step_memory(model, method, params, tx, batch, length)["temporaries"]
  logits_bytes = batch * length * config.vocab_size * 4  # 32 MiB
  # Measured: 11.8 MiB fused (every temporary of the step), 67.6 MiB from logits (logits, softmax, gradient).
  assert fused < logits_bytes / 2 and plain > 2 * logits_bytes, (plain, fused)


def test_fused_head_loss_in_bfloat16():
  """bf16 compute (bf16 hidden and head, float32 logits): close to the float32 loss, gradients in bf16."""
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  x, w = jax.random.normal(k[0], (2, 9, 16)), jax.random.normal(k[1], (16, 40)) * 0.3
  ids, mask = jax.random.randint(k[2], (2, 9), 0, 40), jnp.ones((2, 9), jnp.int32)
  head = losses.Head("lm_head/kernel", tied=False)
  loss = lambda x, w: losses.head_loss(x, {"lm_head": {"kernel": w}}, head, ids, mask, True)[0]
  want = loss(x, w)
  got, grads = jax.value_and_grad(loss, argnums=(0, 1))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  np.testing.assert_allclose(float(got), float(want), rtol=2e-2)
  assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_a_changed_output_layer_falls_back_to_logits():
  """A method group beside lm_head's kernel, or a quantized kernel, is not the plain head the fused loss knows."""
  from jft import quant

  w = np.random.RandomState(0).randn(64, 128).astype(np.float32)
  assert losses.output_head({"lm_head": {"kernel": w}}) == losses.Head("lm_head/kernel", tied=False)
  assert losses.output_head({"lm_head": {"kernel": w, "lora": {"a": w[:, :2]}}}) is None
  assert losses.output_head({"lm_head": {"kernel": quant.quantize_array(w)}}) is None


def test_evaluation_through_the_fused_head_equals_the_logits_path(monkeypatch):
  """Label-word accuracy and the responses' loss run the head only at response tokens and the answer position,
  with the numbers of the full logits (`loss_and_perplexity` takes the training loss's `model_loss`)."""
  from jft.objectives import evaluate

  config = jft.ModelConfig(family="llama", vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
  model = jft.Transformer(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  rows = []
  for i in range(7):  # prompts of 5-30 tokens, a one-token label word (ids 7 or 9) then one more token
    prompt = list(rng.integers(10, 300, 5 + 4 * i))
    rows.append((prompt + [7 + 2 * (i % 2), 3], [0] * len(prompt) + [1, 1]))
  labels, label_ids = [i % 2 for i in range(7)], [7, 9]
  monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 4 * 300 * 4)  # chunks of 4 positions
  calls = _counted(monkeypatch, "head_loss", "next_token_loss")
  jax.clear_caches()  # traced here, with the counters in place (not a trace an earlier test left)
  fused = evaluate.classification(model, params, rows, labels, label_ids, batch_size=4)
  assert calls["head_loss"] and not calls["next_token_loss"], calls  # the fused head ran
  fused_traces = len(calls["head_loss"])
  _unfused(monkeypatch)
  jax.clear_caches()  # the jitted evaluation function would keep its fused trace
  plain = evaluate.classification(model, params, rows, labels, label_ids, batch_size=4)
  assert calls["next_token_loss"] and len(calls["head_loss"]) == fused_traces, calls  # then the logits path
  assert set(fused) == set(plain) == {"loss", "perplexity", "accuracy"}
  for key in plain:
    assert fused[key] == pytest.approx(plain[key], rel=1e-5), key
  assert 0 < plain["accuracy"] < 1  # a random model: some answers right and some wrong, so both count
