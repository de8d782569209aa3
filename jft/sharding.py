"""Meshes and shardings: the one place that decides where arrays live.

A mesh has named axes (`data`, `fsdp`, `tensor`); `-1` takes the remaining
devices, so one device is simply the trivial mesh. Partition specs come from
path rules (`jft.rules`); a spec longer than an array's rank is an error
naming the path. Batches are split over (`data`, `fsdp`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jft import rules
from jft.errors import JftError

AXES = ("data", "fsdp", "tensor")
REPLICATED = ((r".*", P()),)


class ShardingError(JftError, ValueError):
  pass


def make_mesh(shape: dict | None = None, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {"data": -1})
  sizes = [int(shape.get(a, 1)) for a in AXES]
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or len(devices) % known:
    raise ShardingError(f"mesh {shape} does not fit {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ShardingError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def specs(tree, rule_list=REPLICATED):
  """Tree of PartitionSpecs (one per leaf; a QuantizedTensor gets one for all its arrays)."""
  def check(path, leaf, spec):
    if len(spec) > len(getattr(leaf, "shape", ())):
      raise ShardingError(f"{path}: spec {spec} has more axes than the array's shape {leaf.shape}")
    return spec
  return rules.map_tree(rule_list, tree, fn=check, what="sharding rule", require_all_rules_match=False)


def shardings(tree, mesh: Mesh, rule_list=REPLICATED):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs(tree, rule_list),
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def put(tree, mesh: Mesh, rule_list=REPLICATED):
  return jax.device_put(tree, shardings(tree, mesh, rule_list))
