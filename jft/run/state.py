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

from jft import peft
from jft.models import sharding
from jft.core import rules


@dataclasses.dataclass
class State:
  trainable: Any
  frozen: Any
  opt_state: Any  # None when built without an optimizer; abstract (shapes + shardings) if asked
  tx: Any
  mesh: Mesh
  shardings: dict  # {"trainable", "frozen", "opt_state"}: trees of NamedSharding

  def step_shardings(self) -> dict:
    """in/out shardings for `jft.run.step.make_train_step`."""
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


def _placed(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def describe(method, base, mesh: Mesh, *, seed: int = 0, make_tx=None, axis_rules=sharding.AXIS_RULES,
             overrides=()) -> State:
  """The state as shapes and shardings only (ShapeDtypeStructs): nothing is allocated.

  `base` may itself be abstract (`jax.eval_shape`, `quant.abstract_quantize`), so
  layouts and compiled-step memory of models whose weights are not here can be studied.
  """
  abstract_t, abstract_f, (t_specs, f_specs), _ = specs(method, base, mesh, seed, axis_rules, overrides)
  t_sh, f_sh = sharding.to_shardings(t_specs, mesh), sharding.to_shardings(f_specs, mesh)
  tx = opt_state = o_sh = None
  if make_tx is not None:
    tx = make_tx(abstract_t)
    shapes = jax.eval_shape(tx.init, abstract_t)
    o_sh = sharding.opt_state_shardings(shapes, t_sh, mesh)
    opt_state = _placed(shapes, o_sh)
  return State(_placed(abstract_t, t_sh), _placed(abstract_f, f_sh), opt_state, tx, mesh,
               {"trainable": t_sh, "frozen": f_sh, "opt_state": o_sh})


def build(method, base, mesh: Mesh, *, seed: int, make_tx=None, abstract_opt_state: bool = False,
          axis_rules=sharding.AXIS_RULES, overrides=()) -> State:
  """The method's leaves added to `base` and split, every array placed by the rules.

  `base` (host or device arrays, the same in every process) is consumed.
  `make_tx(trainable)` builds the optimizer; with `abstract_opt_state` its
  state is only described (a checkpoint's restore template), not allocated.
  """
  plan = describe(method, base, mesh, seed=seed, make_tx=make_tx, axis_rules=axis_rules, overrides=overrides)
  t_sh, f_sh = plan.shardings["trainable"], plan.shardings["frozen"]
  placement = rules.flatten(peft.combine(t_sh, f_sh))
  base = sharding.put(base, rules.unflatten({p: placement[p] for p in rules.flatten(base)}))
  init = jax.jit(_init_fn(method), out_shardings=(t_sh, f_sh), donate_argnums=1)
  trainable, frozen = init(jax.random.PRNGKey(seed), base)
  opt_state = plan.opt_state
  if plan.tx is not None and not abstract_opt_state:
    opt_state = jax.jit(plan.tx.init, out_shardings=plan.shardings["opt_state"])(trainable)
  return dataclasses.replace(plan, trainable=trainable, frozen=frozen, opt_state=opt_state)
