"""The sharding module on its own: meshes from config, rule-based specs with rank checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jft import quant, sharding

TREE = {"layers": {"q": {"kernel": jnp.zeros((2, 8, 4))}}, "embed": jnp.zeros((16, 8))}


def test_mesh_takes_the_remaining_devices():
  mesh = sharding.make_mesh({"data": -1})
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.size == len(jax.devices())
  with pytest.raises(sharding.ShardingError, match="needs|does not fit"):
    sharding.make_mesh({"data": len(jax.devices()) + 1})


def test_specs_follow_rules_and_check_rank():
  specs = sharding.specs(TREE, ((r"layers/.*/kernel", P(None, "fsdp", "tensor")), (r".*", P())))
  assert specs["layers"]["q"]["kernel"] == P(None, "fsdp", "tensor") and specs["embed"] == P()
  with pytest.raises(sharding.ShardingError, match=r"embed: spec .* more axes than the array's shape \(16, 8\)"):
    sharding.specs(TREE, ((r"embed", P("data", "fsdp", "tensor")), (r".*", P())))


def test_put_places_trees_with_quantized_leaves():
  q = quant.quantize_array(np.random.RandomState(0).randn(2, 64, 32).astype(np.float32))
  tree = {"kernel": q, "bias": jnp.zeros(32)}
  placed = sharding.put(tree, sharding.make_mesh())
  np.testing.assert_array_equal(quant.dequantize(placed["kernel"]), quant.dequantize(q))
  assert placed["bias"].sharding.is_fully_replicated
