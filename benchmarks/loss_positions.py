"""What running the output head only where the loss mask asks buys, against the logits path.

    python benchmarks/loss_positions.py [--repeats 5]
    python benchmarks/loss_positions.py --quick      # smoke run: tiny shapes, 1 repeat (seconds)

On the race's 58M Llama shape (d 512, vocab 32k, 8 x 256 tokens), in one
process with the two paths alternating:
- the head and loss alone (forward and input gradient), for three masks:
  every token (language modelling), SFT (each row's first 30-70% is its
  prompt) and a label word (the last two tokens);
- one DPO train step, LoRA on all linears, 4 pairs x 256 with 30-70% prompts:
  the policy's and the reference's completion log-probs through
  `jft.models.head.head_logps` against the model's logits.
Prints a Markdown table of medians (seconds) and XLA's temporaries (MiB).
`--quick` runs the same code (both paths, their agreement checked) on a
2-layer d=32 model, 4 x 32 tokens, vocabulary 512, one timed call each: it
checks that the benchmark runs, its times mean nothing.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jft.models import head as losses
from jft import objectives, peft
from jft.run.memory import memory_of
from jft.models import hf
from jft.models.transformer import Transformer
from jft.run.step import make_train_step

BATCH, LENGTH, D, VOCAB = 8, 256, 512, 32000
INTER, LAYERS, HEADS = 1376, 8, 8  # the DPO row's model: the race's 58M Llama
QUICK = dict(BATCH=4, LENGTH=32, D=32, VOCAB=512, INTER=64, LAYERS=2, HEADS=4)  # --quick


def masks(rng):
  positions = np.arange(LENGTH)[None]
  starts = rng.integers(int(0.3 * LENGTH), int(0.7 * LENGTH), (BATCH, 1))
  return {"every token": np.ones((BATCH, LENGTH), np.int32),
          "SFT, 30-70% prompt": (positions >= starts).astype(np.int32),
          "label word": np.broadcast_to(positions >= LENGTH - 2, (BATCH, LENGTH)).astype(np.int32)}


def median_time(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def head_rows(repeats):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((BATCH, LENGTH, D)), jnp.float32)
  w = jnp.asarray(0.02 * rng.standard_normal((D, VOCAB)), jnp.float32)
  ids = jnp.asarray(rng.integers(3, VOCAB, (BATCH, LENGTH)), jnp.int32)
  head = losses.Head("lm_head/kernel", tied=False)
  fused = jax.jit(jax.grad(lambda x, m: losses.head_loss(x, {"lm_head": {"kernel": w}}, head, ids, m, False)[0]))
  plain = jax.jit(jax.grad(lambda x, m: losses.next_token_loss(jnp.einsum("btd,dv->btv", x, w), ids, m)[0]))
  rows = []
  for name, mask in masks(rng).items():
    mask = jnp.asarray(mask)
    np.testing.assert_allclose(fused(x, mask), plain(x, mask), atol=1e-5)
    timed = {}
    for _ in range(2):  # alternate the two paths twice, keep each one's best median
      for label, fn in (("logits", plain), ("fused", fused)):
        timed[label] = min(timed.get(label, np.inf), median_time(fn, (x, mask), repeats))
    rows.append(f"| head + loss, {name} | {timed['logits']:.2f} | {timed['fused']:.2f} | - | - |")
  return rows


def dpo_row(repeats):
  config = hf.config_from_hf(dict(model_type="llama", hidden_size=D, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                                  tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-5))
  model = Transformer(config)
  method = peft.LoRA(rank=8, alpha=16.0, targets=(".*_proj",))
  params = method.init(jax.random.PRNGKey(1), model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
  trainable, frozen = peft.split(method, params)
  tx = optax.adamw(1e-4)
  rng = np.random.default_rng(0)
  starts = rng.integers(int(0.3 * LENGTH), int(0.7 * LENGTH), (BATCH // 2, 1, 1))
  batch = {"input_ids": jnp.asarray(rng.integers(3, VOCAB, (BATCH // 2, 2, LENGTH)), jnp.int32),
           "attention_mask": jnp.ones((BATCH // 2, 2, LENGTH), jnp.int32),
           "loss_mask": jnp.asarray(np.broadcast_to(np.arange(LENGTH) >= starts, (BATCH // 2, 2, LENGTH)), jnp.int32)}
  steps, output_head = {}, losses.output_head
  try:
    for label in ("logits", "fused"):  # the path is chosen while the step is traced
      losses.output_head = output_head if label == "fused" else (lambda p: None)
      step = make_train_step(model, method, tx, objective=objectives.build("dpo"), donate=False)
      steps[label] = step.lower(trainable, tx.init(trainable), frozen, batch, jax.random.PRNGKey(0)).compile()
  finally:
    losses.output_head = output_head
  args = (trainable, tx.init(trainable), frozen, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(steps["fused"](*args)[2]["loss"]), float(steps["logits"](*args)[2]["loss"]),
                             rtol=1e-5)
  timed = {}
  for _ in range(2):
    for label in ("logits", "fused"):
      timed[label] = min(timed.get(label, np.inf), median_time(steps[label], args, repeats))
  mib = {label: memory_of(step)["temporaries"] / 2**20 for label, step in steps.items()}
  return [f"| DPO step, LoRA all, {BATCH // 2} pairs x {LENGTH} | {timed['logits']:.2f} | {timed['fused']:.2f} "
          f"| {mib['logits']:,.0f} | {mib['fused']:,.0f} |"]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per median (default 5; 1 with --quick)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: the same code on tiny shapes (d 32, 4 x 32 tokens), 1 repeat")
  args = parser.parse_args()
  if args.quick:
    globals().update(QUICK)
  repeats = args.repeats or (1 if args.quick else 5)
  print("| what | logits path s | fused s | logits temporaries MiB | fused temporaries MiB |")
  print("|---|---:|---:|---:|---:|")
  for row in head_rows(repeats) + dpo_row(repeats):
    print(row, flush=True)


if __name__ == "__main__":
  main()
