"""The run state, built once and placed by the sharding rules.

Training, `jft eval`, `jft export` and `jft generate` all build it here:

    jax.eval_shape(init)                       shapes only, nothing computed
      -> shardings from the logical-axis rules (params, then optimizer state like its param)
      -> jit(init, out_shardings=...)          the method's leaves made where they live
      -> jit(tx.init, out_shardings=...)       Adam moments sharded like their parameters

so arrays are placed once and never drift: the train step is jitted with
the same shardings in and out (`State.step_shardings`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh

from jft import peft, rules, sharding


@dataclasses.dataclass
class State:
  trainable: Any
  frozen: Any
  opt_state: Any  # None when built without an optimizer; abstract (shapes + shardings) if asked
  tx: Any
  mesh: Mesh
  shardings: dict  # {"trainable", "frozen", "opt_state"}: trees of NamedSharding

  def step_shardings(self) -> dict:
    """in/out shardings for `jft.step.make_train_step`."""
    return {**self.shardings, "batch": sharding.batch_sharding(self.mesh),
            "replicated": sharding.replicated(self.mesh)}

  def layout(self) -> dict:
    return sharding.layout({"params": peft.combine(self.trainable, self.frozen), "opt_state": self.opt_state},
                           self.mesh)


def _init_fn(method):
  return lambda rng, params: peft.split(method, method.init(rng, params))


def specs(method, base, mesh: Mesh, seed: int = 0, axis_rules=sharding.AXIS_RULES, overrides=()):
  """(abstract trainable, abstract frozen, their PartitionSpecs, the base's) without computing anything."""
  abstract_t, abstract_f = jax.eval_shape(_init_fn(method), jax.random.PRNGKey(seed), base)
  all_specs = sharding.param_specs(peft.combine(abstract_t, abstract_f), mesh, method, axis_rules, overrides)
  t_specs, f_specs = peft.split(method, all_specs)
  flat = rules.flatten(all_specs)
  base_specs = rules.unflatten({p: flat[p] for p in rules.flatten(base)})
  return abstract_t, abstract_f, (t_specs, f_specs), base_specs


def build(method, base, mesh: Mesh, *, seed: int, make_tx=None, abstract_opt_state: bool = False,
          axis_rules=sharding.AXIS_RULES, overrides=()) -> State:
  """The method's leaves added to `base` and split, every array placed by the rules.

  `base` (host or device arrays, the same in every process) is consumed.
  `make_tx(trainable)` builds the optimizer; with `abstract_opt_state` its
  state is only described (a checkpoint's restore template), not allocated.
  """
  _, _, (t_specs, f_specs), base_specs = specs(method, base, mesh, seed, axis_rules, overrides)
  t_sh, f_sh = sharding.to_shardings(t_specs, mesh), sharding.to_shardings(f_specs, mesh)
  base = sharding.put(base, sharding.to_shardings(base_specs, mesh))
  init = jax.jit(_init_fn(method), out_shardings=(t_sh, f_sh), donate_argnums=1)
  trainable, frozen = init(jax.random.PRNGKey(seed), base)
  tx = opt_state = o_sh = None
  if make_tx is not None:
    tx = make_tx(trainable)
    shapes = jax.eval_shape(tx.init, trainable)
    o_sh = sharding.opt_state_shardings(shapes, t_sh, mesh)
    if abstract_opt_state:
      opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, o_sh)
    else:
      opt_state = jax.jit(tx.init, out_shardings=o_sh)(trainable)
  return State(trainable, frozen, opt_state, tx, mesh, {"trainable": t_sh, "frozen": f_sh, "opt_state": o_sh})
