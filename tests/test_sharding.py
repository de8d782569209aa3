"""The sharding module on its own: meshes, logical axes of every method's leaves, rules -> specs,
quantized kernels, optimizer state, and the named errors. Specs are computed on abstract meshes
(`jax.sharding.AbstractMesh`), so no devices are needed; test_mesh.py runs them on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jft import cli, peft, quant
from jft.models import sharding
from jft.core import rules
from jft.run import state
from jft.models.config import ModelConfig
from jft.models.transformer import Transformer

CONFIG = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)


def mesh(data=1, fsdp=1, tensor=1):
  return AbstractMesh((data, fsdp, tensor), sharding.AXES)


@pytest.fixture(scope="module")
def base():
  params = Transformer(CONFIG).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
  return jax.tree.map(np.asarray, params)


def flat_specs(method, params, m, **kw):
  _, _, (t, f), _ = state.specs(method, params, m, **kw)
  return rules.flatten(t), rules.flatten(f)


def test_mesh_takes_the_remaining_devices():
  m = sharding.make_mesh({"data": -1})
  assert m.axis_names == ("data", "fsdp", "tensor") and m.size == len(jax.devices())
  with pytest.raises(sharding.ShardingError, match=r"mesh \{'data': 2\} does not fit 1 devices"):
    sharding.make_mesh({"data": 2})
  with pytest.raises(sharding.ShardingError, match="unknown axis"):
    sharding.make_mesh({"model": 1})


def test_base_follows_the_model_table_and_layers_are_never_split(base):
  t, f = flat_specs(peft.Full(), base, mesh(1, 2, 4))
  assert t["embed_tokens/embedding"] == P("tensor", "fsdp")
  assert t["layers/self_attn/q_proj/kernel"] == P(None, "fsdp", "tensor")
  assert t["layers/self_attn/o_proj/kernel"] == P(None, "tensor", "fsdp")
  assert t["layers/mlp/down_proj/kernel"] == P(None, "tensor", "fsdp")
  assert t["layers/input_layernorm/scale"] == P(None, None) and t["norm/scale"] == P(None)
  assert t["lm_head/kernel"] == P("fsdp", "tensor") and f == {}


def test_method_leaves_follow_their_base(base):
  lora = peft.LoRA(rank=4, targets=("q_proj", "down_proj"))
  t, f = flat_specs(lora, base, mesh(1, 2, 4))
  assert t["layers/self_attn/q_proj/lora/a"] == P(None, "fsdp", None)
  assert t["layers/self_attn/q_proj/lora/b"] == P(None, None, "tensor")
  assert t["layers/mlp/down_proj/lora/a"] == P(None, "tensor", None)
  assert t["layers/mlp/down_proj/lora/b"] == P(None, None, "fsdp")
  assert f["layers/self_attn/q_proj/lora/scale"] == P(None)
  t, _ = flat_specs(peft.DoRA(rank=4, targets=("v_proj",)), base, mesh(1, 2, 4))
  assert t["layers/self_attn/v_proj/lora/magnitude"] == P(None, "tensor")
  t, _ = flat_specs(peft.IA3(), base, mesh(1, 2, 4))
  assert t["layers/self_attn/k_proj/ia3/output"] == P(None, "tensor")
  assert t["layers/mlp/down_proj/ia3/input"] == P(None, "tensor")
  t, _ = flat_specs(peft.Bottleneck(size=8), base, mesh(1, 2, 4))
  assert t["layers/mlp/bottleneck/down"] == P(None, "fsdp", None)
  assert t["layers/mlp/bottleneck/up_bias"] == P(None, "fsdp")
  t, _ = flat_specs(peft.BitFit(), base, mesh(1, 2, 4))
  assert t["layers/self_attn/q_proj/bias"] == P(None, "tensor") and t["layers/mlp/down_proj/bias"] == P(None, "fsdp")
  t, _ = flat_specs(peft.Prefix(num_virtual_tokens=4), base, mesh(1, 2, 4))
  assert t["layers/self_attn/prefix/keys"] == P(None, None, "tensor")
  t, _ = flat_specs(peft.PromptTuning(num_virtual_tokens=4), base, mesh(1, 2, 4))
  assert t["prompt/embeddings"] == P(None, "fsdp")
  t, _ = flat_specs(peft.PTuning(num_virtual_tokens=4, encoder_hidden=8), base, mesh(1, 2, 4))
  assert set(t.values()) <= {P(None), P(None, None)}  # a small encoder: replicated
  t, _ = flat_specs(peft.Compose((peft.LoRA(rank=2), peft.BitFit())), base, mesh(1, 2, 4))
  assert t["layers/self_attn/q_proj/lora/a"] == P(None, "fsdp", None) and t["layers/mlp/up_proj/bias"] == P(None, "tensor")


def test_quantized_kernels_take_the_dense_spec_swapped(base):
  q, _ = quant.quantize(base, blocksize=16, verbose=False)
  kernel = q["layers"]["self_attn"]["q_proj"]["kernel"]
  assert kernel.codes.shape == (2, 64, 32) and kernel.absmax_codes.shape == (2, 64, 4)  # [L, out, in/2], [L, out, in/16]
  _, f = flat_specs(peft.LoRA(rank=4), q, mesh(1, 2, 4))
  spec = f["layers/self_attn/q_proj/kernel"]
  assert (spec.codes, spec.absmax_codes, spec.absmax_scale, spec.absmax_offset) == (
      P(None, "tensor", "fsdp"), P(None, "tensor", "fsdp"), P(None, None), P(None))
  # Per-row storage dequantizes to the same weight, and a shard of rows dequantizes on its own.
  rows = jax.tree.map(lambda a: a[:, :32] if a.ndim == 3 else a, kernel)
  rows.stored_shape = (32, 64)
  np.testing.assert_array_equal(quant.dequantize(rows), quant.dequantize(kernel)[..., :32])


def test_quantized_blocks_are_never_split(base):
  q, _ = quant.quantize(base, blocksize=32, verbose=False)  # 64 / 32 = 2 blocks per row
  with pytest.raises(sharding.ShardingError, match=r"q_proj/kernel \(quantized nf4, block 32\): dimension 2 of size 2 "
                                                   r"does not divide over mesh axes \('fsdp',\) \(4 devices\)"):
    flat_specs(peft.LoRA(rank=4), q, mesh(1, 4, 1))
  wide = quant.quantize_array(np.ones((2, 48, 8), np.float32), blocksize=32)  # rows of 48: blocks cross rows
  assert not wide.row_layout and wide.codes.shape == (2, 1, 192)
  with pytest.raises(quant.QuantizationError, match="not a whole number of blocks"):
    quant.partition_specs(wide, P(None, "fsdp", None))


def test_named_errors_for_bad_layouts(base):
  with pytest.raises(sharding.ShardingError, match=r"embed_tokens/embedding: dimension 1 \('embed'\) of size 64 does "
                                                   r"not divide over mesh axes \('fsdp',\) \(3 devices\) of mesh"):
    flat_specs(peft.Full(), base, mesh(1, 3, 1))
  no_rule = tuple(r for r in sharding.AXIS_RULES if r[0] != "mlp")
  with pytest.raises(sharding.ShardingError, match=r"logical axis 'mlp' has no rule"):
    flat_specs(peft.Full(), base, mesh(), axis_rules=no_rule)
  with pytest.raises(sharding.ShardingError, match=r"more axes than the array's shape"):
    flat_specs(peft.Full(), base, mesh(), overrides=((r"norm/scale", ("fsdp", None)),))
  twice = (("embed", "fsdp"), ("vocab", "fsdp")) + sharding.AXIS_RULES
  with pytest.raises(sharding.ShardingError, match="uses mesh axis 'fsdp' twice"):
    flat_specs(peft.Full(), base, mesh(1, 2, 1), axis_rules=twice)
  with pytest.raises(sharding.ShardingError, match=r"soft_prompt: no logical axes"):
    sharding.logical_axes({**base, "soft_prompt": np.zeros((4, 64))}, peft.LoRA())


def test_overrides_are_per_layer_and_skip_the_layer_axis(base):
  t, _ = flat_specs(peft.Full(), base, mesh(1, 2, 1), overrides=((r"layers/mlp/.*/kernel", (None, "fsdp")),))
  assert t["layers/mlp/up_proj/kernel"] == P(None, None, "fsdp")
  with pytest.raises(rules.RuleError, match="sharding override"):
    flat_specs(peft.Full(), base, mesh(1, 2, 1), overrides=((r"layers/nothing", (None,)),))


def test_optimizer_state_is_sharded_like_its_parameter(base):
  m = sharding.make_mesh({"data": 1})
  method = peft.LoRA(rank=4)
  st = state.build(method, base, m, seed=0, make_tx=lambda t: optax.MultiSteps(optax.adamw(1e-3), 2))
  params = rules.flatten(st.shardings["trainable"])
  matched = 0
  for keypath, s in jax.tree_util.tree_flatten_with_path(st.shardings["opt_state"])[0]:
    path = sharding._keystr(keypath)
    owner = [p for p in params if path.endswith("/" + p)]
    if owner:  # Adam's moments and MultiSteps' accumulated gradients
      assert s.spec == params[owner[0]].spec, (path, s.spec)
      matched += 1
    else:  # counts
      assert s.spec == P(), path
  assert matched == 3 * len(params)
  for tx in (optax.adafactor(1e-3), optax.sgd(1e-3, momentum=0.9)):
    abstract = jax.eval_shape(tx.init, st.trainable)
    shardings = sharding.opt_state_shardings(abstract, st.shardings["trainable"], m)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)


def test_batches_must_divide_the_batch_axes():
  with pytest.raises(sharding.ShardingError, match=r"train.batch_size=6 does not divide over the batch axes "
                                                   r"data x fsdp = 4"):
    sharding.check_batch(mesh(2, 2, 2), 6)
  assert sharding.process_rows(sharding.make_mesh(), 4) == (0, 4)


def test_layout_report(base):
  st = state.build(peft.LoRA(rank=4), base, sharding.make_mesh(), seed=0, make_tx=lambda t: optax.adam(1e-3))
  report = st.layout()
  assert report["mesh"]["shape"] == {"data": 1, "fsdp": 1, "tensor": 1}
  paths = {(leaf["group"], leaf["path"]) for leaf in report["leaves"]}
  assert ("params", "layers/self_attn/q_proj/lora/a") in paths
  assert any(g == "opt_state" and p.endswith("mu/layers/self_attn/q_proj/lora/a") for g, p in paths)
  assert report["per_device_bytes"]["params"] == sum(
      leaf["bytes_per_device"] for leaf in report["leaves"] if leaf["group"] == "params")


def test_checkpoints_restore_with_the_template_shardings(tmp_path):
  """Restore places arrays as the template says; checkpoints that still hold step/rng arrays restore."""
  from jft.run import checkpoint

  m = sharding.make_mesh()
  target = jax.sharding.NamedSharding(m, P(None, "fsdp"))
  mngr = checkpoint.manager(str(tmp_path), keep=2)
  old = {"trainable": {"a": jnp.ones((2, 4))}, "opt_state": {"b": jnp.zeros(3)}, "step": jnp.int32(3),
         "rng": jax.random.PRNGKey(0)}
  mngr.save(3, old, {"data": {}})
  template = {"trainable": {"a": jax.ShapeDtypeStruct((2, 4), jnp.float32, sharding=target)},
              "opt_state": {"b": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=sharding.replicated(m))}}
  step, restored, meta = checkpoint.manager(str(tmp_path), keep=2).restore(template)
  assert step == 3 and set(restored) == {"trainable", "opt_state"} and meta == {"data": {}}
  assert restored["trainable"]["a"].sharding == target
  np.testing.assert_array_equal(restored["trainable"]["a"], np.ones((2, 4)))


def test_distributed_flags_are_checked():
  with pytest.raises(sharding.ShardingError, match="--coordinator needs --num-processes and --process-id"):
    sharding.initialize_distributed("127.0.0.1:1234")
  with pytest.raises(sharding.ShardingError, match=r"--process-id 2 is not in \[0, 2\)"):
    sharding.initialize_distributed("127.0.0.1:1234", 2, 2)
