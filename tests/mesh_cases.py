"""Train steps on simulated meshes, run in a subprocess with 8 CPU devices.

`python tests/mesh_cases.py OUT.json METHOD@MESH ...` (the caller sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts) runs the
same 5 train steps of each method on one device (`METHOD@1`, always added) and
on each mesh given, and writes
per case the losses, every param and optimizer-state leaf's actual
PartitionSpec, the spec the rules give, and the compiled step's memory.
"""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jft import peft, quant
from jft.models import sharding
from jft.run import state
from jft.run.memory import compile_step, memory_of
from jft.models.config import ModelConfig
from jft.models.transformer import Transformer
from jft.run.step import make_train_step

# Every dimension a rule may split divides by 8 (fsdp) and 4 (tensor); rows hold 8 blocks of 32.
CONFIG = ModelConfig(family="llama", vocab_size=128, hidden_size=256, intermediate_size=512, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=64)
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = {
    "full": (peft.Full(), None),
    "lora": (peft.LoRA(rank=4, alpha=8.0, targets=ALL_LINEARS), None),
    "qlora": (peft.LoRA(rank=4, alpha=8.0, targets=ALL_LINEARS), "nf4"),
    "dora": (peft.DoRA(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")), None),
    "bottleneck": (peft.Bottleneck(size=16), None),
    "prompt": (peft.PromptTuning(num_virtual_tokens=4, init_from="random"), None),
}
MESHES = {"1": {"data": 1}, "8x1x1": {"data": 8}, "1x8x1": {"fsdp": 8},
          "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}, "1x2x4": {"fsdp": 2, "tensor": 4}}
BATCH, LENGTH, STEPS = 8, 16, 5


def model_and_base(fmt):
  model = Transformer(CONFIG)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda x: 0.5 * x, params)
  if fmt:
    params, _ = quant.quantize(params, blocksize=32, verbose=False)
  return model, jax.tree.map(np.asarray, params)


def batches():
  rng = np.random.RandomState(0)
  out = []
  for _ in range(STEPS):
    ids = rng.randint(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    mask = np.ones((BATCH, LENGTH), np.int32)
    mask[1::2, -5:] = 0  # right padding on every other row
    out.append({"input_ids": ids, "attention_mask": mask})  # the loss covers the real tokens
  return out


def spec_strings(tree) -> dict:
  spec = lambda v: v if isinstance(v, jax.sharding.PartitionSpec) else v.sharding.spec
  return {sharding._keystr(k): str(spec(v)) for k, v in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}


def run_case(method_name: str, mesh_name: str, cache: dict) -> dict:
  method, fmt = METHODS[method_name]
  if fmt not in cache:
    cache[fmt] = model_and_base(fmt)
  model, base = cache[fmt]
  devices = jax.devices()[:1] if mesh_name == "1" else jax.devices()
  mesh = sharding.make_mesh(MESHES[mesh_name], devices)
  tx = optax.adamw(1e-3, weight_decay=0.0)
  st = state.build(method, jax.tree.map(np.array, base), mesh, seed=0, make_tx=lambda _: tx)
  _, _, (t_specs, f_specs), _ = state.specs(method, base, mesh)
  model = model.clone(settings=dataclasses.replace(model.settings, sharding=sharding.activation_sharding(mesh)))
  step = make_train_step(model, method, tx, shardings=st.step_shardings())
  trainable, opt_state, losses = st.trainable, st.opt_state, []
  # Compiled once, from the state's description, for both the memory figures and the steps
  # (a jit call after `compiled_step_memory` would compile it again).
  step = compile_step(step, st, BATCH, LENGTH)
  memory = memory_of(step)
  for i, batch in enumerate(batches()):
    trainable, opt_state, metrics = step(trainable, opt_state, st.frozen, sharding.host_batch(mesh, batch),
                                         np.asarray(jax.random.PRNGKey(i)))
    losses.append(float(metrics["loss"]))
  expected_opt = jax.tree.map(lambda s: s.spec, st.shardings["opt_state"])
  return {"losses": losses, "memory": memory,
          "actual": {"trainable": spec_strings(trainable), "frozen": spec_strings(st.frozen),
                     "opt_state": spec_strings(opt_state)},
          "expected": {"trainable": spec_strings(t_specs), "frozen": spec_strings(f_specs),
                       "opt_state": spec_strings(expected_opt)}}


def main(out: str, *cases: str):
  assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  cache, results = {}, {}
  for method_name in dict.fromkeys(c.split("@")[0] for c in cases):
    for case in [f"{method_name}@1"] + [c for c in cases if c.startswith(method_name + "@")]:
      results[case] = run_case(method_name, case.split("@")[1], cache)
  with open(out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(*sys.argv[1:])
