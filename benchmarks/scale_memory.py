"""Per-device memory of a Llama-3-8B LoRA / QLoRA train step on 8 devices: DP, FSDP, FSDP+TP.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scale_memory.py [--out FILE]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scale_memory.py --quick  # smoke run

No weights are needed: the model is built from Llama-3-8B's published shape (config.json
values below), the base is abstract (and abstractly NF4-quantized), the state is placed by
jft's sharding rules and the train step is compiled on a simulated 8-device CPU mesh. XLA's
memory analysis of that compiled step gives bytes per device (arguments = params + optimizer
state + batch; temporaries = activations and workspace). The params and optimizer-state columns
are exact for any backend; the step total is XLA:CPU's, which has no bfloat16 matmul and keeps
float32 copies of the bf16 weights it multiplies (about 0.8 GiB per layer here), so on GPU/TPU
the total is lower. `--quick` compiles two of the six steps (LoRA on FSDP+TP, QLoRA on FSDP)
for a 2-layer Llama of the same layout (d 512, 8 x 32 tokens) and prints the table instead of
writing it (unless `--out`): a smoke test of the script, in seconds.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

from jft import peft, quant
from jft.models import sharding
from jft.run.memory import sharded_step_memory
from jft.models.config import ModelConfig
from jft.models.transformer import Transformer

LLAMA3_8B = ModelConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        max_position_embeddings=8192, rope_theta=500000.0)
# --quick: Llama-3's layout (GQA, untied head), as small as NF4 blocks of 64 split over 8 (embed) and 4 (heads, mlp)
TINY_LLAMA = ModelConfig(family="llama", vocab_size=512, hidden_size=512, intermediate_size=256, num_layers=2,
                         num_heads=8, num_kv_heads=4, head_dim=32, max_position_embeddings=256,
                         rope_theta=500000.0)
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MESHES = {"DP (8,1,1)": {"data": 8}, "FSDP (1,8,1)": {"fsdp": 8}, "FSDP+TP (1,2,4)": {"fsdp": 2, "tensor": 4}}
BASES = ("LoRA (bf16 base)", "QLoRA (NF4 + DQ base)")
QUICK_CELLS = ((BASES[0], "FSDP+TP (1,2,4)"), (BASES[1], "FSDP (1,8,1)"))  # --quick: both bases, the split meshes


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
  parser.add_argument("--length", type=int, help="default 2048 (32 with --quick)")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--out", help="default benchmarks/scale_memory.md (with --quick: print the table only)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: a 2-layer d=512 Llama instead of Llama-3-8B, 32 tokens per row, 2 cells")
  args = parser.parse_args()
  args.length = args.length or (32 if args.quick else 2048)
  if not args.quick and not args.out:
    args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale_memory.md")
  if len(jax.devices()) != 8:
    sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  name = "tiny Llama (--quick)" if args.quick else "Llama-3-8B"
  model = Transformer(TINY_LLAMA if args.quick else LLAMA3_8B, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                      remat="full")
  base = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"])
  bases = dict(zip(BASES, (base, quant.abstract_quantize(base))))
  cells = QUICK_CELLS if args.quick else [(b, mesh) for b in BASES for mesh in MESHES]
  method = peft.LoRA(rank=args.rank, alpha=2.0 * args.rank, targets=ALL_LINEARS)
  tx = optax.adamw(1e-4)
  unit = "MiB" if args.quick else "GiB"  # a tiny model's GiB would all read 0.00
  size = lambda b: f"{b / 2**(20 if args.quick else 30):.2f}"
  lines = [f"# {name} per-device memory ({unit}), {args.batch} x {args.length} tokens, LoRA r={args.rank} on all "
           "linears, AdamW, full remat, bf16 compute", "",
           "Compiled train step on a simulated 8-device CPU mesh (`benchmarks/scale_memory.py`); params and "
           "optimizer state as placed by jft's sharding rules (exact on any backend); step total = XLA:CPU's "
           "arguments + outputs + temporaries - donated, which includes float32 copies of bf16 weights that "
           "XLA:CPU makes for its matmuls (GPU/TPU compile lower).", "",
           "| base | mesh | params | optimizer state | step total |", "|---|---|---:|---:|---:|"]
  for base_name, mesh_name in cells:
    t0 = time.time()
    m = sharded_step_memory(model, method, bases[base_name], sharding.make_mesh(MESHES[mesh_name]), tx, args.batch,
                            args.length)
    lines.append(f"| {base_name} | {mesh_name} | {size(m['state_params'])} | {size(m['state_opt_state'])} | "
                 f"{size(m['total'])} |")
    print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
  if not args.out:
    print("\n".join(lines))
    return
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
