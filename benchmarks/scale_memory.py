"""Per-device memory of a Llama-3-8B LoRA / QLoRA train step on 8 devices: DP, FSDP, FSDP+TP.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scale_memory.py [--out FILE]

No weights are needed: the model is built from Llama-3-8B's published shape (config.json
values below), the base is abstract (and abstractly NF4-quantized), the state is placed by
jft's sharding rules and the train step is compiled on a simulated 8-device CPU mesh. XLA's
memory analysis of that compiled step gives bytes per device (arguments = params + optimizer
state + batch; temporaries = activations and workspace). The params and optimizer-state columns
are exact for any backend; the step total is XLA:CPU's, which has no bfloat16 matmul and keeps
float32 copies of the bf16 weights it multiplies (about 0.8 GiB per layer here), so on GPU/TPU
the total is lower.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

from jft import peft, quant, sharding
from jft.estimate import sharded_step_memory
from jft.models.config import ModelConfig
from jft.models.transformer import Transformer

LLAMA3_8B = ModelConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        max_position_embeddings=8192, rope_theta=500000.0)
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MESHES = {"DP (8,1,1)": {"data": 8}, "FSDP (1,8,1)": {"fsdp": 8}, "FSDP+TP (1,2,4)": {"fsdp": 2, "tensor": 4}}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale_memory.md"))
  args = parser.parse_args()
  if len(jax.devices()) != 8:
    sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  model = Transformer(LLAMA3_8B, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat="full")
  base = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"])
  bases = {"LoRA (bf16 base)": base, "QLoRA (NF4 + DQ base)": quant.abstract_quantize(base)}
  method = peft.LoRA(rank=args.rank, alpha=2.0 * args.rank, targets=ALL_LINEARS)
  tx = optax.adamw(1e-4)
  gib = lambda b: f"{b / 2**30:.2f}"
  lines = [f"# Llama-3-8B per-device memory (GiB), {args.batch} x {args.length} tokens, LoRA r={args.rank} on all "
           "linears, AdamW, full remat, bf16 compute", "",
           "Compiled train step on a simulated 8-device CPU mesh (`benchmarks/scale_memory.py`); params and "
           "optimizer state as placed by jft's sharding rules (exact on any backend); step total = XLA:CPU's "
           "arguments + outputs + temporaries - donated, which includes float32 copies of bf16 weights that "
           "XLA:CPU makes for its matmuls (GPU/TPU compile lower).", "",
           "| base | mesh | params | optimizer state | step total |", "|---|---|---:|---:|---:|"]
  for base_name, b in bases.items():
    for mesh_name, shape in MESHES.items():
      t0 = time.time()
      m = sharded_step_memory(model, method, b, sharding.make_mesh(shape), tx, args.batch, args.length)
      lines.append(f"| {base_name} | {mesh_name} | {gib(m['state_params'])} | {gib(m['state_opt_state'])} | "
                   f"{gib(m['total'])} |")
      print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
