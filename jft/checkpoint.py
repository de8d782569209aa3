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

from jft import errors


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                               item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: dict, meta: dict):
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, abstract_state: dict, step: int | None = None, upgrade=None):
  """-> (step, state, meta) of `step` (default: the latest); arrays placed as the template's shardings.

  A checkpoint written by an older jft (leaves since renamed, step and rng
  once stored as arrays) is read as written and matched to the template by
  path, `upgrade(old path) -> path` (the method's `upgrade_path`) renaming
  its leaves; anything that still differs is an error naming the paths.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  read = lambda template: mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
  try:
    out = read(abstract_state)
    return step, out["state"], out["meta"]
  except ValueError:
    out = read(None)
  upgrade = upgrade or (lambda path: path)
  saved = {upgrade(_path(p)): v for p, v in jax.tree_util.tree_flatten_with_path(out["state"])[0]}
  saved = {p: v for p, v in saved.items() if p not in ("step", "rng")}  # moved to the JSON metadata
  wanted, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  paths = [_path(p) for p, _ in wanted]
  missing, extra = sorted(set(paths) - set(saved)), sorted(set(saved) - set(paths))
  if missing or extra:
    raise errors.CheckpointMismatchError(
        f"{mngr.directory}/{step}: does not match this run (missing {missing[:4]}, unexpected {extra[:4]})")
  leaves = []
  for path, (_, like) in zip(paths, wanted):
    if tuple(saved[path].shape) != tuple(like.shape):
      raise errors.ShapeMismatchError(f"{mngr.directory}/{step}: {path} has shape {tuple(saved[path].shape)}, "
                                      f"expected {tuple(like.shape)}")
    leaves.append(jax.device_put(jnp.asarray(saved[path], like.dtype), like.sharding))
  return step, jax.tree_util.tree_unflatten(treedef, leaves), out["meta"]


def _path(keys) -> str:
  """A tree path as `a/0/mu/b` whatever the containers (dicts, tuples, named tuples)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)
