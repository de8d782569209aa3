"""One accelerator's numbers: tokens/s, MFU and peak device memory of jft's train step, per cell.

Cells: {SmolLM2-135M shape, Llama-3.2-1B shape} x {LoRA, QLoRA, full fine-tuning}, bfloat16 compute
(float32 adapter leaves; full fine-tuning keeps float32 master weights), random weights (the shapes are
written as config.json from their known dimensions: nothing is downloaded), next-token loss on random
tokens, AdamW. The batch is the largest power of two whose estimated step memory
(`jft.studies.estimate.memory`) fits in 85% of the device; FLOPs per step come from the estimator
(`flops_per_step`: matmuls of the forward and backward pass, what the step actually computes), the peak
from the device kind (H100/H200: 989 TFLOP/s bf16 dense). Each cell runs in its own process so its peak
memory (`device.memory_stats()`) is its own, and an out-of-memory cell halves its batch and tries again.

    python benchmarks/device.py                 # every cell, the table (benchmarks/device.sh calls this)
    python benchmarks/device.py --dry-run       # build every cell's step abstractly (lower, no compile) and stop
    python benchmarks/device.py --cell 1b:lora  # one cell, one JSON line
    python benchmarks/device.py --torch         # the same cells in torch + peft + bitsandbytes (CUDA only)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: nothing is fetched from a hub

# Known dimensions (the models' own config.json files on the Hub).
SHAPES = {
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2),
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                         hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu", bos_token_id=128000,
                         eos_token_id=128001,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}
SHORT = {"135m": "smollm2-135m", "1b": "llama-3.2-1b"}
METHODS = ("lora", "qlora", "full")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LENGTH = 1024
MEMORY_FRACTION = 0.85
# Dense bf16 matmul peak by device kind (substring, lower case) -> jft.studies.estimate.HARDWARE.
PEAK_BY_KIND = (("h200", "h200"), ("h100", "h100-80g"), ("a100", "a100-80g"))
GOALS = ("Goals for when this runs on an H100/H200: LoRA bf16 >= 50% MFU for the Llama-3.2-1B shape; "
         "QLoRA's step <= 1.2x LoRA's.")


def model_folder(shape: str) -> str:
  """A folder holding only the shape's config.json: enough for `model_config` and the estimator."""
  folder = os.path.join(tempfile.gettempdir(), f"jft-device-{shape}")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    with open(path + ".tmp", "w") as f:
      json.dump(SHAPES[shape], f, indent=1)
    os.replace(path + ".tmp", path)
  return folder


def cell_config(shape: str, method: str, batch: int, length: int):
  from jft.config import schema

  c = schema.default_config()
  c.model.update(name=model_folder(shape), dtype="bfloat16", param_dtype="float32" if method == "full" else "")
  c.objective.name = "lm"
  c.method.name = "full" if method == "full" else "lora"
  c.method.hparams = {} if method == "full" else dict(rank=16, alpha=32.0, targets=LINEARS)
  c.quant.format = "nf4" if method == "qlora" else ""
  c.data.update(path="random-tokens", max_length=length)
  c.train.update(batch_size=batch, steps=100)
  c.optim.lr = 1e-5 if method == "full" else 1e-4
  return c


class Cell:
  """One cell's parts, abstract until `place` is called: model, method, optimizer, step, shapes, FLOPs."""

  def __init__(self, shape: str, method: str, batch: int, length: int):
    import jax
    import jax.numpy as jnp

    from jft import objectives, peft, quant, run
    from jft.models import hf
    from jft.models.pretrained import model_config
    from jft.models.transformer import Transformer
    from jft.run import step as steps
    from jft.studies import estimate

    self.shape, self.method_name, self.batch, self.length = shape, method, batch, length
    self.config = c = cell_config(shape, method, batch, length)
    self.model_config = mc = model_config(c.model.name)
    self.param_dtype = jnp.dtype(c.model.param_dtype or c.model.dtype)
    self.model = Transformer(mc, dtype=jnp.dtype(c.model.dtype), param_dtype=self.param_dtype, remat=c.model.remat)
    self.method = objectives.method_of(c)
    base = hf.abstract_params(mc, self.param_dtype)
    if c.quant.format:
      base = quant.abstract_quantize(base, quant.rules_for(c.quant.format), blocksize=c.quant.blocksize,
                                     double_quant=c.quant.double_quant)
    self.abstract_base = base
    trainable, frozen = jax.eval_shape(lambda rng, p: peft.split(self.method, self.method.init(rng, p)),
                                       jax.random.PRNGKey(0), base)
    self.tx = run.make_tx(c, trainable, self.method)
    opt_state = jax.eval_shape(self.tx.init, trainable)
    self.shapes = estimate.Shapes(mc, self.method, trainable, frozen, opt_state, batch, length, c.model.remat, 2)
    self.flops = estimate.flops_per_step(self.shapes)["total"]
    self.memory_estimate = estimate.memory(self.shapes)["total"]
    self.step = steps.make_train_step(self.model, self.method, self.tx, objective=objectives.from_config(c))
    self.abstract_batch = {k: jax.ShapeDtypeStruct((batch, length), jnp.int32)
                           for k in ("input_ids", "attention_mask")}

  def lower(self):
    import jax

    return self.step.lower(self.shapes.trainable, self.shapes.opt_state, self.shapes.frozen, self.abstract_batch,
                           jax.random.PRNGKey(0))

  def place(self, seed: int = 0):
    """Random weights made on the device (quantized there for QLoRA), the method's leaves, AdamW's state."""
    import jax
    import jax.numpy as jnp

    from jft import peft, quant

    c = self.config
    init = jax.jit(lambda rng: self.model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
    base = init(jax.random.PRNGKey(seed))
    if c.quant.format:
      base, _ = quant.quantize(base, quant.rules_for(c.quant.format), blocksize=c.quant.blocksize,
                               double_quant=c.quant.double_quant)
    trainable, frozen = jax.jit(lambda rng, p: peft.split(self.method, self.method.init(rng, p)))(
        jax.random.PRNGKey(seed + 1), base)
    opt_state = jax.jit(self.tx.init)(trainable)
    ids = jax.random.randint(jax.random.PRNGKey(seed + 2), (self.batch, self.length), 0,
                             self.model_config.vocab_size, jnp.int32)
    return trainable, opt_state, frozen, {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}


def peak_flops():
  """(hardware name, dense bf16 FLOP/s) of this device, or (its kind, None) when the kind is not in the table."""
  import jax

  from jft.studies import estimate

  kind = jax.devices()[0].device_kind
  for key, name in PEAK_BY_KIND:
    if key in kind.lower():
      return name, estimate.HARDWARE[name].peak_flops["bfloat16"]
  return kind, None


def device_memory() -> int:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get("bytes_limit", 0))


def pick_batch(shape: str, method: str, length: int, capacity: int, largest: int = 512) -> int:
  """The largest power of two whose estimated step memory fits `MEMORY_FRACTION` of `capacity`."""
  batch = 1
  while batch * 2 <= largest and Cell(shape, method, batch * 2, length).memory_estimate <= MEMORY_FRACTION * capacity:
    batch *= 2
  return batch


def run_cell(shape: str, method: str, batch: int, length: int, seconds: float = 10.0, max_steps: int = 50) -> dict:
  """Compile, warm up, then time steps for about `seconds`; -> one row (JSON-able)."""
  import jax

  cell = Cell(shape, method, batch, length)
  t0 = time.time()
  compiled = cell.lower().compile()
  compile_s = time.time() - t0
  trainable, opt_state, frozen, batch_arrays = cell.place()
  rng = jax.random.PRNGKey(0)
  for _ in range(2):  # warm-up
    trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch_arrays, rng)
  jax.block_until_ready(metrics)
  steps, t0 = 0, time.time()
  while steps < max_steps and (steps < 3 or time.time() - t0 < seconds):
    trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch_arrays, rng)
    steps += 1
    if steps % 5 == 0:
      jax.block_until_ready(metrics)
  jax.block_until_ready(metrics)
  step_s = (time.time() - t0) / steps
  hw, peak = peak_flops()
  stats = jax.devices()[0].memory_stats() or {}
  return dict(side="jft", shape=shape, method=method, batch=batch, length=length, steps=steps,
              compile_s=round(compile_s, 1), step_s=step_s, tokens_per_s=batch * length / step_s,
              flops_per_step=cell.flops, mfu=None if peak is None else cell.flops / step_s / peak, hardware=hw,
              peak_memory_gib=stats.get("peak_bytes_in_use", 0) / 2**30, loss=float(metrics["loss"]))


def dry_run(length: int = 128, batch: int = 2) -> list[dict]:
  """Every cell's step built and lowered on abstract arrays (nothing allocated or compiled), and the batch the
  estimator would pick on an 80 GiB device at the real length; the torch cells' models built on the meta device."""
  rows = []
  for shape in SHAPES:
    for method in METHODS:
      t0 = time.time()
      cell = Cell(shape, method, batch, length)
      text = cell.lower().as_text()
      rows.append(dict(shape=shape, method=method, lowered_chars=len(text), flops_per_step=cell.flops,
                       h100_batch=pick_batch(shape, method, LENGTH, 80 * 2**30), seconds=round(time.time() - t0, 1)))
      print(json.dumps(rows[-1]), flush=True)
  torch_note = torch_dry_run()
  print(torch_note, flush=True)
  return rows


# ---- the torch + peft + bitsandbytes peer ---------------------------------------------------------------

def torch_model(shape: str, method: str, device: str):
  """transformers' Llama of the shape (random weights), with peft's LoRA on the same linears for lora/qlora;
  QLoRA's base is bitsandbytes NF4 (double quantization), loaded from a saved random model."""
  import torch
  import transformers

  config = transformers.LlamaConfig(**{k: v for k, v in SHAPES[shape].items() if k not in ("architectures",)})
  if method == "qlora":
    folder = os.path.join(tempfile.gettempdir(), f"jft-device-torch-{shape}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
      transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant,
                                                              dtype=torch.bfloat16, device_map={"": 0})
  else:
    with torch.device(device):
      model = transformers.AutoModelForCausalLM.from_config(
          config, dtype=torch.float32 if method == "full" else torch.bfloat16)
  if method != "full":
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(LINEARS),
                                                       lora_dropout=0.0))
    for p in model.parameters():  # adapter leaves in float32, as jft trains them
      if p.requires_grad:
        p.data = p.data.float()
  return model


def torch_dry_run() -> str:
  try:
    import peft  # noqa: F401
    import torch  # noqa: F401
  except ImportError as e:
    return json.dumps({"side": "torch", "skipped": f"not installed: {e}"})
  for shape in SHAPES:
    for method in ("lora", "full"):  # QLoRA needs bitsandbytes on a CUDA device: built only when one is there
      torch_model(shape, method, "meta")
  return json.dumps({"side": "torch", "built_on_meta": [f"{s}:{m}" for s in SHAPES for m in ("lora", "full")]})


def run_torch_cell(shape: str, method: str, batch: int, length: int, seconds: float = 10.0,
                   max_steps: int = 50) -> dict:
  """The peer's step (autocast bf16, gradient checkpointing, fused AdamW); FLOPs and MFU are added by the
  driver from jft's estimator, so this side needs no jax."""
  import torch

  model = torch_model(shape, method, "cuda")
  if method == "full":
    model.to("cuda")
  model.config.use_cache = False
  model.gradient_checkpointing_enable()
  if hasattr(model, "enable_input_require_grads"):
    model.enable_input_require_grads()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
  ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, length), device="cuda")

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(2):
    step()
  torch.cuda.synchronize()
  steps, t0 = 0, time.time()
  while steps < max_steps and (steps < 3 or time.time() - t0 < seconds):
    loss = step()
    steps += 1
  torch.cuda.synchronize()
  step_s = (time.time() - t0) / steps
  return dict(side="torch", shape=shape, method=method, batch=batch, length=length, steps=steps, compile_s=0.0,
              step_s=step_s, tokens_per_s=batch * length / step_s, hardware=torch.cuda.get_device_name(),
              peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, loss=float(loss))


# ---- the driver --------------------------------------------------------------------------------------------

def _child(python: str, args: list[str], timeout: float) -> dict:
  """One cell in its own process: its own peak memory, and an OOM there does not end the table."""
  try:
    out = subprocess.run([python, os.path.abspath(__file__), *args], capture_output=True, text=True,
                         timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not lines:
    tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)[-400:]}
  return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
  head = ("| side | shape | method | batch x length | step (s) | tokens/s | MFU | peak memory (GiB) | compile (s) |\n"
          "|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r.get('side', 'jft')} | {r.get('shape')} | {r.get('method')} | - | - | - | - | - | "
                   f"{r['error'][:80]} |")
      continue
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(f"| {r['side']} | {r['shape']} | {r['method']} | {r['batch']} x {r['length']} | {r['step_s']:.3f} | "
                 f"{r['tokens_per_s']:,.0f} | {mfu} | {r['peak_memory_gib']:.1f} | {r['compile_s']} |")
  return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
  """The goals, checked where their cells ran."""
  got = {(r.get("side"), r.get("shape"), r.get("method")): r for r in rows if "error" not in r}
  out = []
  lora = got.get(("jft", "llama-3.2-1b", "lora"))
  if lora and lora["mfu"] is not None:
    out.append(f"LoRA 1B MFU {100 * lora['mfu']:.1f}% (goal >= 50%): {'met' if lora['mfu'] >= 0.5 else 'missed'}")
  for shape in SHAPES:
    lo, q = got.get(("jft", shape, "lora")), got.get(("jft", shape, "qlora"))
    if lo and q:
      ratio = (q["step_s"] / q["batch"]) / (lo["step_s"] / lo["batch"])
      out.append(f"{shape}: QLoRA/LoRA step time per row {ratio:.2f}x (goal <= 1.2x): "
                 f"{'met' if ratio <= 1.2 else 'missed'}")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dry-run", action="store_true", help="build every cell's step abstractly and stop")
  p.add_argument("--cell", help="SHAPE:METHOD (135m|1b : lora|qlora|full): run one cell, print one JSON line")
  p.add_argument("--batch", type=int, default=0, help="with --cell: the batch (0: the largest that fits)")
  p.add_argument("--length", type=int, default=LENGTH)
  p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per cell")
  p.add_argument("--torch", action="store_true", help="the torch + peft + bitsandbytes cells (with --cell: one)")
  p.add_argument("--torch-python", default=sys.executable, help="the interpreter of the torch cells (its own venv)")
  p.add_argument("--cell-timeout", type=float, default=150.0)
  p.add_argument("--deadline", type=float, default=450.0, help="seconds for the whole table; later cells are skipped")
  p.add_argument("--out", help="append the table (markdown) to this file")
  args = p.parse_args(argv)

  if args.dry_run:
    dry_run()
    print("dry run: every cell's step built (lowered on abstract shapes); nothing compiled or run")
    return 0
  if args.cell:
    shape, _, method = args.cell.partition(":")
    shape = SHORT.get(shape, shape)
    if shape not in SHAPES or method not in METHODS:
      p.error(f"--cell {args.cell}: expected SHAPE:METHOD with SHAPE in {', '.join(SHORT)} and METHOD in "
              f"{', '.join(METHODS)}")
    if args.torch:  # the peer's interpreter may have no jax: the batch comes from the driver
      print(json.dumps(run_torch_cell(shape, method, args.batch or 1, args.length, args.seconds)), flush=True)
    else:
      batch = args.batch or pick_batch(shape, method, args.length, device_memory())
      print(json.dumps(run_cell(shape, method, batch, args.length, args.seconds)), flush=True)
    return 0

  import jax

  print(f"backend {jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"{device_memory() / 2**30:.1f} GiB", flush=True)
  rows, t_start = [], time.time()
  sides = [False] + ([True] if args.torch else [])
  for torch_side in sides:
    for shape in SHAPES:
      for method in METHODS:
        left = args.deadline - (time.time() - t_start)
        if left < 30:
          rows.append(dict(side="torch" if torch_side else "jft", shape=shape, method=method,
                           error=f"skipped: the {args.deadline:.0f} s budget is spent"))
          continue
        batch = pick_batch(shape, method, args.length, device_memory())
        while True:
          extra = ["--torch"] if torch_side else []
          cell_args = ["--cell", f"{shape}:{method}", "--batch", str(batch), "--length", str(args.length),
                       "--seconds", str(args.seconds), *extra]
          row = _child(args.torch_python if torch_side else sys.executable, cell_args, min(args.cell_timeout, left))
          row.setdefault("side", "torch" if torch_side else "jft")
          row.setdefault("shape", shape)
          row.setdefault("method", method)
          oom = "error" in row and ("RESOURCE_EXHAUSTED" in row["error"] or "out of memory" in row["error"].lower())
          if not oom or batch == 1:
            break
          batch //= 2
        if "error" not in row and "mfu" not in row:  # the torch side: the same FLOPs, from jft's estimator
          row["flops_per_step"] = Cell(shape, method, row["batch"], row["length"]).flops
          peak = peak_flops()[1]
          row["mfu"] = None if peak is None else row["flops_per_step"] / row["step_s"] / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
  text = table(rows) + "\n\n" + GOALS + "\n" + "\n".join(f"- {v}" for v in verdicts(rows))
  print("\n" + text)
  if args.out:
    with open(args.out, "a") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
