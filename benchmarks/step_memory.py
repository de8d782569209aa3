"""Memory of one compiled train step, method by method, on a dense and a 4-bit base.

    python benchmarks/step_memory.py [--model smollm2-135m] [--batch 4] [--length 128]

Prints a Markdown table (MiB) from XLA's memory analysis of the compiled step;
nothing is trained, so it runs in about a minute on a CPU.
"""

import argparse

import optax

import jft
from jft import peft, quant
from jft.estimate import step_memory

METHODS = {
    "full": peft.Full(),
    "lora q,v": peft.LoRA(rank=8),
    "lora all": peft.LoRA(rank=8, targets=(".*_proj",)),
    "dora all": peft.DoRA(rank=8, targets=(".*_proj",)),
    "ia3": peft.IA3(),
    "prompt 16": peft.PromptTuning(num_virtual_tokens=16),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="smollm2-135m")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=128)
  args = parser.parse_args()
  model, params = jft.load_pretrained(args.model)
  qparams, summary = quant.quantize(params)
  tx = optax.adamw(1e-4)
  mib = lambda b: f"{b / 2**20:.1f}"
  print("| method | base | trainable | arguments | temporaries | total |")
  print("|---|---|---:|---:|---:|---:|")
  for name, method in METHODS.items():
    for base_name, base in (("fp32", params), ("nf4+dq", qparams)):
      if name == "full" and base_name != "fp32":
        continue  # a quantized base cannot be trained in full
      count = peft.count(method, method.init(jax_key(), base)).trainable
      m = step_memory(model, method, base, tx, args.batch, args.length)
      print(f"| {name} | {base_name} | {count:,} | {mib(m['arguments'])} | {mib(m['temporaries'])} | "
            f"{mib(m['total'])} |", flush=True)


def jax_key():
  import jax
  return jax.random.PRNGKey(0)


if __name__ == "__main__":
  main()
