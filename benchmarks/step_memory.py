"""Memory of one compiled train step, method by method, on a dense and a 4-bit base.

    python benchmarks/step_memory.py [--model smollm2-135m] [--batch 4] [--length 128]
    python benchmarks/step_memory.py --quick      # smoke run: a tiny random model, 2 x 16 tokens

Prints a Markdown table (MiB) from XLA's memory analysis of the compiled step;
nothing is trained, so it runs in about a minute on a CPU. `--quick` writes a
random 2-layer Llama (d 64, vocabulary 512) to a temporary folder, loads it as
`--model` would be loaded and compiles three rows (full, LoRA on a dense and
on an NF4 base): the same table in seconds, for a smoke test.
"""

import argparse
import tempfile

import optax

import jft
from jft import peft, quant
from jft.run.memory import step_memory

METHODS = {
    "full": peft.Full(),
    "lora q,v": peft.LoRA(rank=8),
    "lora all": peft.LoRA(rank=8, targets=(".*_proj",)),
    "dora all": peft.DoRA(rank=8, targets=(".*_proj",)),
    "ia3": peft.IA3(),
    "prompt 16": peft.PromptTuning(num_virtual_tokens=16),
}
# (method, base) rows: every method on both bases (a quantized base cannot be trained in full)
CELLS = [(name, base) for name in METHODS for base in ("fp32", "nf4+dq") if name != "full" or base == "fp32"]
QUICK_CELLS = [("full", "fp32"), ("lora all", "fp32"), ("lora all", "nf4+dq")]  # --quick: one row per kind of step


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", help="HF folder, .gguf file or embedded name (default smollm2-135m; with --quick "
                      "a tiny random model)")
  parser.add_argument("--batch", type=int, help="default 4 (2 with --quick)")
  parser.add_argument("--length", type=int, help="default 128 (16 with --quick)")
  parser.add_argument("--quick", action="store_true", help="smoke run: a tiny random model, 2 x 16 tokens")
  args = parser.parse_args()
  args.batch = args.batch or (2 if args.quick else 4)
  args.length = args.length or (16 if args.quick else 128)
  cells = QUICK_CELLS if args.quick else CELLS
  if args.model or not args.quick:
    table(args.model or "smollm2-135m", cells, args.batch, args.length)
    return
  with tempfile.TemporaryDirectory() as folder:
    table(tiny_model(folder), cells, args.batch, args.length)


def tiny_model(folder: str) -> str:
  """A random 2-layer Llama (GQA, tied embeddings) written to `folder` as an HF checkpoint (weights drawn with
  numpy from the model's abstract shapes: no init to compile)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  config = jft.ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                           tie_word_embeddings=True)
  model = jft.Transformer(config)
  shapes = jax.eval_shape(lambda: model.init(jax_key(), jnp.ones((1, 4), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  return jft.save_pretrained(model, params, folder)


def table(name: str, cells, batch: int, length: int):
  model, params = jft.load_pretrained(name)
  qparams, summary = quant.quantize(params)
  tx = optax.adamw(1e-4)
  mib = lambda b: f"{b / 2**20:.1f}"
  print("| method | base | trainable | arguments | temporaries | total |")
  print("|---|---|---:|---:|---:|---:|")
  for name, base_name in cells:
    method, base = METHODS[name], {"fp32": params, "nf4+dq": qparams}[base_name]
    count = peft.count(method, method.init(jax_key(), base)).trainable
    m = step_memory(model, method, base, tx, batch, length)
    print(f"| {name} | {base_name} | {count:,} | {mib(m['arguments'])} | {mib(m['temporaries'])} | "
          f"{mib(m['total'])} |", flush=True)


def jax_key():
  import jax
  return jax.random.PRNGKey(0)


if __name__ == "__main__":
  main()
