"""What a train step costs before running it: memory from the compiled step (XLA's own analysis).

`step_memory` compiles the step on one device; `sharded_step_memory` compiles
it on a mesh with every array placed by the sharding rules, from shapes alone
(no weights needed), and reports bytes per device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jft import peft
from jft.step import make_train_step


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def step_memory(model, method, base, tx, batch: int, length: int) -> dict:
  """Bytes of the compiled train step for `method` on `base` (dense or quantized), batch x length tokens.

  Nothing is executed: the step is lowered with abstract inputs and compiled.
  """
  trainable, frozen = peft.split(method, method.init(jax.random.PRNGKey(0), base))
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  compiled = make_train_step(model, method, tx).lower(
      _abstract(trainable), _abstract(tx.init(trainable)), _abstract(frozen),
      {"input_ids": tokens, "attention_mask": tokens}, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
  return memory_of(compiled)


def memory_of(compiled) -> dict:
  """Per-device bytes of a compiled computation, from XLA's memory analysis.

  `total` = arguments + outputs + temporaries - donated (aliased) bytes.
  """
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
  out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


def sharded_step_memory(model, method, abstract_base, mesh, tx, batch: int, length: int,
                        axis_rules=None, overrides=()) -> dict:
  """Per-device bytes of the train step on `mesh`: state placed by the rules, batch split over
  data x fsdp, activations pinned. `abstract_base` holds ShapeDtypeStructs (or QuantizedTensors
  of them, `quant.abstract_quantize`); nothing is allocated or executed."""
  import dataclasses

  from jft import sharding, state

  axis_rules = sharding.AXIS_RULES if axis_rules is None else axis_rules
  sharding.check_batch(mesh, batch)
  abstract_t, abstract_f, (t_specs, f_specs), _ = state.specs(method, abstract_base, mesh, 0, axis_rules, overrides)
  t_sh, f_sh = sharding.to_shardings(t_specs, mesh), sharding.to_shardings(f_specs, mesh)
  placed = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  trainable, frozen = placed(abstract_t, t_sh), placed(abstract_f, f_sh)
  abstract_opt = jax.eval_shape(tx.init, abstract_t)
  o_sh = sharding.opt_state_shardings(abstract_opt, t_sh, mesh)
  model = model.clone(hooks=dataclasses.replace(model.hooks, sharding=sharding.activation_sharding(mesh, axis_rules)))
  shardings = {"trainable": t_sh, "frozen": f_sh, "opt_state": o_sh, "batch": sharding.batch_sharding(mesh),
               "replicated": sharding.replicated(mesh)}
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=shardings["batch"])
  compiled = make_train_step(model, method, tx, shardings=shardings).lower(
      trainable, placed(abstract_opt, o_sh), frozen, {"input_ids": tokens, "attention_mask": tokens},
      jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
  out = memory_of(compiled)
  report = sharding.layout({"params": peft.combine(trainable, frozen), "opt_state": placed(abstract_opt, o_sh)}, mesh)
  out.update({f"state_{k}": v for k, v in report["per_device_bytes"].items()})
  return out
