"""What a compiled train step takes in device memory, from XLA's own analysis (nothing is executed).

`step_memory` compiles the step on one device; `sharded_step_memory` compiles
it on a mesh with every array placed by the sharding rules, from shapes alone
(no weights needed), and reports bytes per device. Training logs it before the
first step; `jft estimate` holds its analytical model to it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jft import peft
from jft.models import sharding
from jft.run import checkpoint, state
from jft.run.step import make_train_step


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


def compile_step(step_fn, st, batch: int, length: int):
  """A jitted train step compiled ahead of time for the state `st` (a `jft.run.state.State`, built or
  only described) and `{"input_ids", "attention_mask"}` batches of batch x length tokens, split
  over the mesh; the result also runs on arrays of those shapes and shardings."""
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding.batch_sharding(st.mesh))
  lowered = step_fn.lower(checkpoint.abstract(st.trainable), checkpoint.abstract(st.opt_state),
                          checkpoint.abstract(st.frozen), {"input_ids": tokens, "attention_mask": tokens},
                          jax.ShapeDtypeStruct((2,), jnp.uint32))
  return lowered.compile()


def compiled_step_memory(step_fn, st, batch: int, length: int) -> dict:
  """Per-device bytes of a jitted train step for a full batch x length batch (`compile_step`);
  nothing is executed."""
  return memory_of(compile_step(step_fn, st, batch, length))


def sharded_step_memory(model, method, abstract_base, mesh, tx, batch: int, length: int,
                        axis_rules=None, overrides=()) -> dict:
  """Per-device bytes of the train step on `mesh`: state placed by the rules, batch split over
  data x fsdp, activations pinned; plus the state's own bytes per device (`state_params`,
  `state_opt_state`). `abstract_base` holds ShapeDtypeStructs (or QuantizedTensors of them,
  `quant.abstract_quantize`); nothing is allocated or executed."""
  axis_rules = sharding.AXIS_RULES if axis_rules is None else axis_rules
  sharding.check_batch(mesh, batch)
  st = state.describe(method, abstract_base, mesh, make_tx=lambda _: tx, axis_rules=axis_rules, overrides=overrides)
  model = model.clone(settings=dataclasses.replace(model.settings, sharding=sharding.activation_sharding(mesh, axis_rules)))
  out = compiled_step_memory(make_train_step(model, method, tx, shardings=st.step_shardings()), st, batch, length)
  out.update({f"state_{k}": v for k, v in st.layout()["per_device_bytes"].items()})
  return out
