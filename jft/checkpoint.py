"""Run checkpoints with orbax: trainable params and optimizer state (sharded arrays),
plus JSON metadata (data position, best so far).

The frozen base is never written here; a run records which base it needs
(path and content hash, in the run folder) and reloads it from there. Every
process calls `save` and `restore` with its shards (orbax coordinates them);
restore templates carry the target shardings, so a checkpoint written on one
mesh restores onto another.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                               item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: dict, meta: dict):
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, abstract_state: dict, step: int | None = None):
  """-> (step, state, meta) of `step` (default: the latest); arrays placed as the template's shardings."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  restore = lambda template: mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
  try:
    out = restore(abstract_state)
  except ValueError:
    if "step" in abstract_state or "opt_state" not in abstract_state:
      raise
    # Written before step and rng moved to the JSON metadata: they are arrays in the state.
    leaf = jax.tree.leaves(abstract_state)[0]
    replicated = (jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
                  if isinstance(leaf.sharding, jax.sharding.NamedSharding) else leaf.sharding)
    out = restore({**abstract_state, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                   "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)})
    return step, {k: v for k, v in out["state"].items() if k not in ("step", "rng")}, out["meta"]
  return step, out["state"], out["meta"]


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)
