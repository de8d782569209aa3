"""Every method on a tiny Llama: tree shapes, gradients, optimizer state, training, identity, merging."""

import dataclasses
import os
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import padded_batch
from method_contract import loss_fn, perturb, train_a_few_steps

import jft
from jft import peft
from jft.core import rules
from jft.peft import multi

L, D, FFN, KV, V = 2, 32, 48, 16, 101  # the tiny Llama of conftest: 4 heads, 2 kv heads, head_dim 8

# The leaves each method adds (path -> shape), the whole difference to the base tree.
EXPECTED_NEW_LEAVES = {
    "lora": {**{f"layers/self_attn/{m}/{leaf}": s for m, o in (("q_proj", D), ("v_proj", KV))
                for leaf, s in (("lora/a", (L, D, 4)), ("lora/b", (L, 4, o)), ("lora/scale", (L,)))}},
    "dora": {**{f"layers/self_attn/{m}/{leaf}": s for m, o in (("q_proj", D), ("v_proj", KV))
                for leaf, s in (("lora/a", (L, D, 4)), ("lora/b", (L, 4, o)), ("lora/scale", (L,)),
                                ("lora/magnitude", (L, o)))}},
    "ia3": {"layers/self_attn/k_proj/ia3/output": (L, KV), "layers/self_attn/v_proj/ia3/output": (L, KV),
            "layers/mlp/down_proj/ia3/input": (L, FFN)},
    "bitfit": {f"layers/{m}/bias": (L, o) for m, o in (
        ("self_attn/q_proj", D), ("self_attn/k_proj", KV), ("self_attn/v_proj", KV), ("self_attn/o_proj", D),
        ("mlp/gate_proj", FFN), ("mlp/up_proj", FFN), ("mlp/down_proj", D))},
    "bottleneck": {f"layers/{site}/bottleneck/{leaf}": s for site in ("self_attn", "mlp") for leaf, s in (
        ("down", (L, D, 8)), ("down_bias", (L, 8)), ("up", (L, 8, D)), ("up_bias", (L, D)))},
    "prefix": {"layers/self_attn/prefix/keys": (L, 5, KV), "layers/self_attn/prefix/values": (L, 5, KV)},
    "prefix_mlp": {"prefix/encoder/embedding": (5, D), "prefix/encoder/dense_in/kernel": (D, 16),
                   "prefix/encoder/dense_in/bias": (16,), "prefix/encoder/dense_out/kernel": (16, L * 2 * KV),
                   "prefix/encoder/dense_out/bias": (L * 2 * KV,)},
    "prompt": {"prompt/embeddings": (5, D)},
    "ptuning": {"ptuning/embedding": (5, D), "ptuning/mlp/dense_0/kernel": (D, 16),
                "ptuning/mlp/dense_0/bias": (16,), "ptuning/mlp/dense_1/kernel": (16, 16),
                "ptuning/mlp/dense_1/bias": (16,), "ptuning/mlp/dense_2/kernel": (16, D),
                "ptuning/mlp/dense_2/bias": (D,)},
    "ptuning_lstm": {**{f"ptuning/lstm/l{i}_{d}/{w}": s for i, d_in in ((0, D), (1, 32))
                        for d in ("fwd", "bwd") for w, s in (("w_ih", (d_in, 64)), ("w_hh", (16, 64)), ("b", (64,)))},
                     "ptuning/embedding": (5, D), "ptuning/mlp/dense_0/kernel": (32, 32),
                     "ptuning/mlp/dense_0/bias": (32,), "ptuning/mlp/dense_1/kernel": (32, D),
                     "ptuning/mlp/dense_1/bias": (D,)},
    "full": {},
}

METHODS = {
    "lora": peft.LoRA(rank=4, alpha=8),
    "dora": peft.DoRA(rank=4, alpha=8),
    "ia3": peft.IA3(),
    "bitfit": peft.BitFit(),
    "bottleneck": peft.Bottleneck(size=8),
    "prefix": peft.Prefix(num_virtual_tokens=5),
    "prefix_mlp": peft.Prefix(num_virtual_tokens=5, projection=True, encoder_hidden=16),
    "prompt": peft.PromptTuning(num_virtual_tokens=5),
    "ptuning": peft.PTuning(num_virtual_tokens=5, encoder_hidden=16),
    "ptuning_lstm": peft.PTuning(num_virtual_tokens=5, encoder="lstm", encoder_hidden=16),
    "full": peft.Full(freeze=("embed_tokens/.*",)),
}
IDENTITY_AT_INIT = ("lora", "dora", "ia3", "bitfit", "bottleneck")


@pytest.fixture(scope="module")
def base(hf_models):
  model, params = jft.load_pretrained(hf_models("llama")[0])
  ids, mask = padded_batch(V)
  return model, params, jnp.asarray(ids), jnp.asarray(mask)


def shapes(tree):
  return {p: tuple(v.shape) for p, v in rules.flatten(tree).items()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_tree_after_init(name, base):
  model, params, _, _ = base
  method = METHODS[name]
  adapted = method.init(jax.random.PRNGKey(0), params)
  before, after = shapes(params), shapes(adapted)
  assert {p: s for p, s in after.items() if p not in before} == EXPECTED_NEW_LEAVES[name]
  assert all(after[p] == s for p, s in before.items())  # base paths and shapes unchanged
  trainable = set(peft.trainable_paths(method, adapted))
  if name == "full":
    assert trainable == set(before) - {"embed_tokens/embedding"}
  elif name == "bitfit":
    assert trainable == set(EXPECTED_NEW_LEAVES[name])
  else:
    assert trainable == {p for p in EXPECTED_NEW_LEAVES[name] if not p.endswith("lora/scale")}


# Slow: the LSTM encoder's gradients (plain P-tuning stays), the prefix MLP (plain prefix stays),
# DoRA (LoRA stays; DoRA keeps its peft-parity tests).
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n in ("ptuning_lstm", "prefix_mlp", "dora") else n for n in sorted(METHODS)])
def test_train_only_trainable(name, base):
  model, params, ids, mask = base
  method = METHODS[name]
  adapted = method.init(jax.random.PRNGKey(0), params)
  trainable, frozen = peft.split(method, adapted)
  loss = loss_fn(method.configure(model), method, ids, mask)

  # Gradients exist for exactly the trainable leaves ...
  grads = jax.eval_shape(jax.grad(loss), trainable, frozen)  # the tree alone: traced, not run
  assert set(rules.flatten(grads)) == set(rules.flatten(trainable))
  # ... and frozen leaves are not differentiated at all: the backward pass of the
  # split loss has fewer matmuls than one that differentiates every leaf.
  if name != "full":
    split_dots = str(jax.make_jaxpr(jax.grad(loss))(trainable, frozen)).count("dot_general")
    all_dots = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(trainable, frozen)).count("dot_general")
    assert split_dots < all_dots

  # Optimizer state only for trainable leaves, both ways of using optax.
  tx = optax.adam(1e-2)
  state = tx.init(trainable)
  assert set(rules.flatten(state[0].mu)) == set(rules.flatten(trainable))
  masked_state = optax.masked(tx, peft.mask(method, adapted)).init(adapted)
  real = [x for x in jax.tree.leaves(masked_state) if hasattr(x, "shape") and x.ndim > 0]
  assert sum(x.size for x in real) == 2 * sum(x.size for x in jax.tree.leaves(trainable))
  partitioned = optax.partition({"trainable": tx, "frozen": optax.set_to_zero()},
                                peft.labels(method, adapted)).init(adapted)
  real = [x for x in jax.tree.leaves(partitioned) if hasattr(x, "shape") and x.ndim > 0]
  assert sum(x.size for x in real) == 2 * sum(x.size for x in jax.tree.leaves(trainable))

  # A few steps lower the loss, and the trained model differs from the base.
  trainable, state, first = train_a_few_steps(loss, trainable, frozen, tx, state)
  assert float(jax.jit(loss)(trainable, frozen)) < float(first)
  trained = method.materialize(peft.combine(trainable, frozen))
  out = jax.jit(method.configure(model).apply)({"params": trained}, ids, attention_mask=mask)
  ref = jax.jit(model.apply)({"params": params}, ids, attention_mask=mask)
  assert np.abs(np.asarray(out - ref)).max() > 1e-3


@pytest.mark.parametrize("name", IDENTITY_AT_INIT)
def test_identity_at_init(name, base):
  model, params, ids, mask = base
  method = METHODS[name]
  adapted = method.init(jax.random.PRNGKey(0), params)
  out = method.configure(model).apply({"params": adapted}, ids, attention_mask=mask)
  ref = jax.jit(model.apply)({"params": params}, ids, attention_mask=mask)
  np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("method", [peft.LoRA(rank=4, alpha=8, targets=(".*_proj",)), peft.LoRA(rslora=True),
                                    peft.DoRA(rank=4), peft.IA3(), peft.LoRA(init_a="pissa", rank=4)],
                         ids=["lora_all", "rslora", "dora", "ia3", "pissa"])
def test_merge_and_unmerge(method, base):
  model, params, ids, mask = base
  adapted = perturb(method, method.init(jax.random.PRNGKey(0), params))
  out = jax.jit(model.apply)({"params": adapted}, ids, attention_mask=mask)
  merged, adapter = method.merge(adapted)
  assert set(rules.flatten(merged)) == set(rules.flatten(params))  # a plain base-shaped tree
  np.testing.assert_allclose(jax.jit(model.apply)({"params": merged}, ids, attention_mask=mask), out, atol=1e-5)
  restored = method.unmerge(merged, adapter)
  for p, v in rules.flatten(adapted).items():
    np.testing.assert_allclose(rules.flatten(restored)[p], v, atol=1e-5, err_msg=p)


def test_pissa_starts_at_the_base_with_principal_directions(base):
  model, params, ids, mask = base
  method = peft.LoRA(init_a="pissa", rank=4, alpha=8)
  adapted = method.init(jax.random.PRNGKey(0), params)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": adapted}, ids, attention_mask=mask),
                             jax.jit(model.apply)({"params": params}, ids, attention_mask=mask), atol=1e-5)
  q = adapted["layers"]["self_attn"]["q_proj"]
  delta = method.scale * q["lora"]["a"][0] @ q["lora"]["b"][0]
  s = np.linalg.svd(np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][0]), compute_uv=False)
  np.testing.assert_allclose(np.linalg.svd(np.asarray(delta), compute_uv=False)[:4], s[:4], rtol=1e-4)


@pytest.mark.parametrize("name", ["prefix", "prompt", "bottleneck"])
def test_unmergeable_methods_say_so(name, base):
  _, params, _, _ = base
  with pytest.raises(peft.MethodError, match="cannot be merged"):
    METHODS[name].merge(METHODS[name].init(jax.random.PRNGKey(0), params))


def test_reparameterisations_fold_for_inference(base):
  model, params, ids, mask = base
  for method in (METHODS["prefix_mlp"], METHODS["ptuning_lstm"]):
    adapted = method.init(jax.random.PRNGKey(0), params)
    folded, inference_method = method.fold(adapted)
    assert not any(p.startswith(("prefix/encoder", "ptuning")) for p in rules.flatten(folded))
    run = jax.jit(model.apply)
    np.testing.assert_allclose(run({"params": folded}, ids, attention_mask=mask),
                               run({"params": method.materialize(adapted)}, ids, attention_mask=mask))
    assert inference_method.materialize(folded) is folded


def test_lora_dropout_only_in_training(base):
  model, params, ids, mask = base
  method = peft.LoRA(rank=4, dropout=0.5)
  adapted = perturb(method, method.init(jax.random.PRNGKey(0), params))
  m = method.configure(model)
  infer = m.apply({"params": adapted}, ids, attention_mask=mask)
  np.testing.assert_allclose(infer, peft.LoRA(rank=4).configure(model).apply({"params": adapted}, ids,
                                                                             attention_mask=mask))
  train = m.clone(settings=dataclasses.replace(m.settings, deterministic=False))
  a = train.apply({"params": adapted}, ids, attention_mask=mask, rngs={"dropout": jax.random.PRNGKey(1)})
  b = train.apply({"params": adapted}, ids, attention_mask=mask, rngs={"dropout": jax.random.PRNGKey(2)})
  assert np.abs(np.asarray(a - b)).max() > 1e-4


def test_composition_and_conflicts(base):
  model, params, ids, mask = base
  lora_norms = peft.Compose((peft.LoRA(rank=4), peft.Full(train=(".*norm/scale",))))
  adapted = lora_norms.init(jax.random.PRNGKey(0), params)
  trainable = set(peft.trainable_paths(lora_norms, adapted))
  assert "layers/input_layernorm/scale" in trainable and "layers/self_attn/q_proj/lora/a" in trainable
  assert "layers/self_attn/q_proj/kernel" not in trainable
  lora_bitfit = peft.Compose((peft.LoRA(rank=4), peft.BitFit()))
  assert "layers/self_attn/q_proj/bias" in peft.trainable_paths(
      lora_bitfit, lora_bitfit.init(jax.random.PRNGKey(0), params))
  with pytest.raises(peft.MethodError, match="already exists"):
    peft.Compose((peft.LoRA(rank=4), peft.DoRA(rank=4))).init(jax.random.PRNGKey(0), params)
  with pytest.raises(peft.MethodError, match="q_proj/kernel is trained"):
    peft.Compose((peft.LoRA(rank=4), peft.Full())).init(jax.random.PRNGKey(0), params)


def test_target_rules_fail_loudly(base):
  _, params, _, _ = base
  with pytest.raises(rules.RuleError, match=r"'qq_proj'.*nearest paths: .*q_proj"):
    peft.LoRA(targets=("qq_proj",)).init(jax.random.PRNGKey(0), params)
  # Full match only: q_proj must not select q_proj_extra.
  extra = {**params, "layers": {**params["layers"], "self_attn": {
      **params["layers"]["self_attn"], "q_proj_extra": params["layers"]["self_attn"]["q_proj"]}}}
  adapted = peft.LoRA(targets=("q_proj",), rank=4).init(jax.random.PRNGKey(0), extra)
  assert "lora" not in adapted["layers"]["self_attn"]["q_proj_extra"]
  with pytest.raises(rules.RuleError, match="q_proj_extr"):
    peft.LoRA(targets=("layers/self_attn/q_proj_extr",)).init(jax.random.PRNGKey(0), extra)
  with pytest.raises(peft.MethodError, match="unknown method 'lorra'.*did you mean lora"):
    peft.build("lorra")
  with pytest.raises(peft.MethodError, match="method lora has no hyperparameter 'rnak'.*did you mean rank"):
    peft.build("lora", rnak=4)


def test_counts(base):
  _, params, _, _ = base
  method = peft.LoRA(rank=4)
  c = peft.count(method, method.init(jax.random.PRNGKey(0), params))
  lora = L * (D * 4 + 4 * D) + L * (D * 4 + 4 * KV)
  base_total = sum(x.size for x in jax.tree.leaves(params))
  assert (c.trainable, c.total, c.trainable_bytes) == (lora, base_total + lora, 4 * lora)


def test_smollm2_lora_count_pinned(smollm2):
  """LoRA r=8 on q and v of SmolLM2-135M, from the architecture: as peft prints it."""
  model, params = smollm2
  c = peft.count(peft.LoRA(rank=8), peft.LoRA(rank=8).init(jax.random.PRNGKey(0), params))
  d, kv, ffn, layers, vocab = 576, 192, 1536, 30, 49152
  per_layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d
  base_total = vocab * d + layers * per_layer + d
  assert base_total == 134_515_008
  lora = layers * (8 * (d + d) + 8 * (d + kv))
  assert (c.trainable, c.total) == (lora, base_total + lora) == (460_800, 134_975_808)
  assert f"{c.percent:.4f}" == "0.3414"


def test_named_adapters_and_mixed_batch(base):
  model, params, ids, mask = base
  m1, m2 = peft.LoRA(rank=4), peft.LoRA(rank=2, targets=("q_proj", "k_proj", "down_proj"))
  p = multi.add(params, "one", m1, jax.random.PRNGKey(1))
  p = multi.add(p, "two", m2, jax.random.PRNGKey(2))
  p = {**p, "adapters": {"one": perturb(m1, p["adapters"]["one"], 3),
                         "two": perturb(m2, p["adapters"]["two"], 4)}}
  assert multi.names(p) == ["one", "two"]
  with pytest.raises(peft.MethodError, match="already exists"):
    multi.add(p, "one", m1)
  out1 = jax.jit(model.apply)({"params": multi.activate(p, "one")}, ids, attention_mask=mask)
  out2 = jax.jit(model.apply)({"params": multi.activate(p, "two")}, ids, attention_mask=mask)
  assert np.abs(np.asarray(out1 - out2)).max() > 1e-3
  mixed = multi.mixed_apply(model, p, ["two", "one", "two"], ids, mask)
  real = np.asarray(mask, bool)
  for row, ref in enumerate([out2, out1, out2]):
    np.testing.assert_allclose(np.asarray(mixed[row])[real[row]], np.asarray(ref[row])[real[row]], atol=1e-5)
  p = multi.remove(p, "one")
  assert multi.names(p) == ["two"]
  with pytest.raises(peft.MethodError, match="no adapter 'one'"):
    multi.activate(p, "one")


def test_the_readme_method_is_a_whole_method(base, tmp_path):
  """The README's "Add a method" block, run as written: registered, trains only its leaves, in a config."""
  import re
  from typing import ClassVar

  from jft.peft import api
  from method_contract import check_trains_only_its_leaves

  readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
  code = re.search(r"<!-- add-a-method.*?```python\n(.*?)```", readme, re.S).group(1)
  namespace = {"dataclasses": dataclasses, "ClassVar": ClassVar, "jnp": jnp, "api": api}
  exec(code, namespace)
  method = peft.build("output_scale")
  assert isinstance(method, namespace["OutputScale"])
  check_trains_only_its_leaves(method, base, {f"layers/self_attn/{m}/oscale/s": (L, o)
                                              for m, o in (("q_proj", D), ("v_proj", KV))})
  assert peft.decay_mask(method, method.init(jax.random.PRNGKey(0), base[1]))["layers"]["self_attn"]["q_proj"][
      "oscale"]["s"] is False


def test_old_spellings_still_build():
  with pytest.warns(DeprecationWarning, match="'adapters' is deprecated; use 'bottleneck'"):
    assert peft.build("adapters", size=8) == peft.Bottleneck(size=8)
  assert peft.from_hparams(peft.Compose((peft.LoRA(rank=2), peft.BitFit())).hparams()) == peft.Compose(
      (peft.LoRA(rank=2), peft.BitFit()))
