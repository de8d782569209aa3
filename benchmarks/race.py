"""jft against the PyTorch peer (transformers + peft + bitsandbytes), side by side on this machine.

    python benchmarks/race.py                       # every cell, both models -> benchmarks/results.md
    python benchmarks/race.py --models small --cells lora-all,qlora-all --steps 5
    python benchmarks/race.py --compare benchmarks/results-previous.md
    python benchmarks/race.py --quick               # smoke run: one tiny cell per side, report to stdout
    python benchmarks/race.py --workload demo|sft|dpo [--quick]   # whole jobs: benchmarks/workloads.py

Each measurement runs in its own process (a fresh interpreter, so peak RSS is
that side's alone), jft and the peer alternating cell by cell, on the same
weights (one random Llama checkpoint per model shape, written once with
`save_pretrained`), the same token batch, AdamW and precision. Timings on a
shared 2-core machine drift by 10-15% within minutes: only the ratios of one
run mean anything, which is why both sides run in the same invocation.
Not part of the test suite; the peer comes from the test extra. `--quick` runs
every kind of measurement (GEMM rates, one training cell per side, compile time
at two depths, decoding at batch 1) on a 2-layer d=64 Llama, 2 x 32 tokens, 1
warm-up + 1 timed step, and prints the report instead of writing results.md
(unless `--out`): it checks that the race runs, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Shape:
  """A Llama-family shape with random weights, and the batch it trains on."""
  hidden: int
  inter: int
  layers: int
  heads: int
  kv_heads: int
  vocab: int
  tied: bool
  batch: int
  length: int
  square: int = 2048  # the square product of the GEMM-rate worker

  def hf_config(self, layers: int | None = None) -> dict:
    return dict(hidden_size=self.hidden, intermediate_size=self.inter, num_hidden_layers=layers or self.layers,
                num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                tie_word_embeddings=self.tied, max_position_embeddings=2048, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)

  def linear_params(self) -> int:
    """Parameters of every matmul of the forward pass, the output projection included."""
    head_dim = self.hidden // self.heads
    attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
    return self.layers * (attn + 3 * self.hidden * self.inter) + self.hidden * self.vocab


MODELS = {
    "small": Shape(512, 1376, 8, 8, 8, 32000, False, 8, 256),  # 58M, the reference's "small"
    "smollm2-135m": Shape(576, 1536, 30, 9, 3, 49152, True, 8, 128),
}
SHAPES = {**MODELS, "tiny": Shape(64, 128, 2, 4, 2, 512, False, 2, 32, square=128)}  # tiny: --quick, never by default
QUICK = dict(models="tiny", cells="lora-all", steps=1, warmup=1)  # --quick's defaults (an explicit flag wins)

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Cell:
  method: str  # full | lora | dora | ia3 | prompt
  targets: tuple = ()
  quantized: bool = False  # NF4 + double quantization base, fp32 compute
  bf16: bool = False  # bf16 compute (jft: dtype; the peer: torch.autocast)
  bf16_storage: bool = False  # jft: bf16 frozen weights, fp32 compute (the peer: as `bf16`)
  virtual_tokens: int = 20
  sft: bool = False  # loss on the response only: each row's first 30-70% is its prompt


CELLS = {
    "full": Cell("full"),
    "lora-qv": Cell("lora", ("q_proj", "v_proj")),
    "lora-all": Cell("lora", ALL_LINEARS),
    "sft-lora-all": Cell("lora", ALL_LINEARS, sft=True),
    "qlora-all": Cell("lora", ALL_LINEARS, quantized=True),
    "lora-all-bf16": Cell("lora", ALL_LINEARS, bf16=True),
    "lora-all-bf16-storage": Cell("lora", ALL_LINEARS, bf16_storage=True),
    "dora-all": Cell("dora", ALL_LINEARS),
    "ia3": Cell("ia3"),
    "prompt": Cell("prompt"),
}
RANK, ALPHA, LR = 8, 16.0, 1e-4


# ----------------------------------------------------------------------------
# Workers: one process each; the last stdout line is a JSON record.
# ----------------------------------------------------------------------------

def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def token_batch(shape: Shape, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  return rng.integers(3, shape.vocab, (shape.batch, shape.length)).astype(np.int64)


def response_mask(shape: Shape, cell: Cell):
  """1 where a position carries loss: every token, or with `cell.sft` the response after a 30-70% prompt."""
  import numpy as np
  positions = np.arange(shape.length)[None]
  if not cell.sft:
    return np.ones((shape.batch, shape.length), np.int64)
  starts = np.random.default_rng(1).integers(int(0.3 * shape.length), int(0.7 * shape.length), (shape.batch, 1))
  return (positions >= starts).astype(np.int64)


def worker_setup(args):
  """Write one random checkpoint of the shape (torch's init, seed 0) for both sides to load."""
  import torch
  import transformers
  torch.manual_seed(0)
  shape = SHAPES[args.model]
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape.hf_config()))
  model.save_pretrained(args.folder, safe_serialization=True)
  return {"params": sum(p.numel() for p in model.parameters())}


def jft_method(cell: Cell):
  from jft import peft
  if cell.method == "full":
    return peft.Full()
  if cell.method in ("lora", "dora"):
    kind = peft.DoRA if cell.method == "dora" else peft.LoRA
    return kind(targets=cell.targets, rank=RANK, alpha=ALPHA)
  if cell.method == "ia3":
    return peft.IA3()
  return peft.PromptTuning(num_virtual_tokens=cell.virtual_tokens)


def timed_steps(run_step, warmup: int, steps: int, budget_s: float) -> list[float]:
  """Step times after `warmup` steps; stops early past `budget_s` (then the last step stands for all).

  The budget keeps a side that is 50x slower (torch's bf16 on a CPU without
  AVX-512 BF16) from holding the race for an hour; its row says how many steps it got.
  """
  times, begin = [], time.perf_counter()
  for i in range(warmup + steps):
    start = time.perf_counter()
    run_step(i)
    times.append(time.perf_counter() - start)
    if time.perf_counter() - begin > budget_s:
      break
  return times[warmup:] if len(times) > warmup else times[-1:]


def worker_jft(args):
  import jax
  import jax.numpy as jnp
  import optax

  import jft
  from jft import peft, quant
  from jft.step import make_train_step  # the name every revision answers to (a --baseline tree too)

  cell, shape = CELLS[args.cell], SHAPES[args.model]
  model, params = jft.load_pretrained(args.folder, param_dtype=jnp.bfloat16 if cell.bf16_storage else None)
  if cell.bf16:
    model = model.clone(dtype=jnp.bfloat16)  # fp32 storage and optimizer, bf16 compute
  if cell.quantized:
    params, _ = quant.quantize(params, verbose=False)
  method = jft_method(cell)
  trainable, frozen = peft.split(method, method.init(jax.random.PRNGKey(0), params))
  del params
  tx = optax.adamw(LR)
  opt_state = tx.init(trainable)
  ids = jnp.asarray(token_batch(shape), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
           "loss_mask": jnp.asarray(response_mask(shape, cell), jnp.int32)}
  start = time.perf_counter()
  step = make_train_step(model, method, tx).lower(
      trainable, opt_state, frozen, batch, jax.random.PRNGKey(0)).compile()
  compile_s = time.perf_counter() - start
  state = {"trainable": trainable, "opt_state": opt_state, "losses": []}

  def run(i):
    state["trainable"], state["opt_state"], metrics = step(state["trainable"], state["opt_state"], frozen, batch,
                                                           jax.random.PRNGKey(i))
    state["losses"].append(float(metrics["loss"]))  # blocks until the step is done

  times = timed_steps(run, args.warmup, args.steps, args.budget)
  return {"times": times, "compile_s": compile_s, "loss0": state["losses"][0],
          "trainable": peft.count(method, peft.combine(state["trainable"], frozen)).trainable,
          "rss_mib": peak_rss_mib()}


def worker_peer(args):
  import torch
  import transformers
  cell, shape = CELLS[args.cell], SHAPES[args.model]
  torch.set_num_threads(args.threads)
  kw = dict(dtype=torch.float32, attn_implementation="sdpa")
  if cell.quantized:
    kw["quantization_config"] = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    kw["device_map"] = "cpu"
  model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, **kw)
  if cell.method != "full":
    import peft
    if cell.quantized:
      model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cell.method in ("lora", "dora"):
      config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(cell.targets),
                               use_dora=cell.method == "dora", task_type="CAUSAL_LM")
    elif cell.method == "ia3":
      config = peft.IA3Config(task_type="CAUSAL_LM")
    else:
      config = peft.PromptTuningConfig(num_virtual_tokens=cell.virtual_tokens, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=LR)
  ids = torch.as_tensor(token_batch(shape))
  mask = torch.ones_like(ids)
  labels = torch.where(torch.as_tensor(response_mask(shape, cell)) == 1, ids, -100)  # -100: no loss
  losses = []

  def run(i):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cell.bf16 or cell.bf16_storage):
      loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))

  times = timed_steps(run, args.warmup, args.steps, args.budget)
  return {"times": times, "compile_s": 0.0, "loss0": losses[0], "trainable": sum(p.numel() for p in trainable),
          "rss_mib": peak_rss_mib()}


def worker_gemm(args):
  """Matmul rate (GFLOP/s) on square and model-shaped products, fp32 and bf16: JAX's, or torch's with `--side peer`."""
  shape = SHAPES[args.model]
  tokens = shape.batch * shape.length
  shapes = [(shape.square,) * 3, (tokens, shape.hidden, shape.inter), (tokens, shape.inter, shape.hidden),
            (tokens, shape.hidden, shape.vocab)]
  if args.side == "peer":
    import torch
    torch.set_num_threads(args.threads)
    make = lambda m, k, dtype: torch.ones(m, k, dtype=getattr(torch, dtype))
    matmul = lambda a, b: a @ b
  else:
    import jax
    import jax.numpy as jnp
    make = lambda m, k, dtype: jnp.ones((m, k), dtype)
    jitted = jax.jit(jnp.dot)
    matmul = lambda a, b: jitted(a, b).block_until_ready()
  out = {}
  for dtype in ("float32", "bfloat16"):
    for m, k, n in shapes:
      a, b = make(m, k, dtype), make(k, n, dtype)
      start = time.perf_counter()
      matmul(a, b)
      if time.perf_counter() - start > 10:  # torch's bf16 without AVX-512 BF16: one product says enough
        out[f"{dtype} {m}x{k}x{n}"] = 2 * m * k * n / (time.perf_counter() - start) / 1e9
        continue
      matmul(a, b)
      reps = []
      for _ in range(9):
        start = time.perf_counter()
        matmul(a, b)
        reps.append(time.perf_counter() - start)
      out[f"{dtype} {m}x{k}x{n}"] = 2 * m * k * n / statistics.median(reps) / 1e9
  return {"gflops": out, "rss_mib": peak_rss_mib()}


def worker_compile(args):
  """Seconds to compile jft's LoRA-all step at `--layers` layers (scan: should not grow with depth)."""
  import jax
  import jax.numpy as jnp
  import optax

  from jft.models import hf
  from jft.models.transformer import Transformer
  from jft.step import make_train_step  # the name every revision answers to (a --baseline tree too)
  shape = SHAPES[args.model]
  config = hf.config_from_hf({"model_type": "llama", **shape.hf_config(args.layers)})
  model = Transformer(config)
  method = jft_method(CELLS["lora-all"])
  ids = jax.ShapeDtypeStruct((shape.batch, shape.length), jnp.int32)
  abstract = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))
  from jft import peft
  trainable, frozen = peft.split(method, abstract)
  tx = optax.adamw(LR)
  opt_state = jax.eval_shape(tx.init, trainable)
  start = time.perf_counter()
  make_train_step(model, method, tx).lower(trainable, opt_state, frozen, {"input_ids": ids, "attention_mask": ids},
                                           jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
  return {"compile_s": time.perf_counter() - start, "rss_mib": peak_rss_mib()}


def worker_generate(args):
  """Greedy decoding tokens/s, `--batch` prompts of 32 tokens, 64 new tokens each (no stop token)."""
  import numpy as np
  shape = SHAPES[args.model]
  prompts = np.random.default_rng(1).integers(3, shape.vocab, (args.batch, 32))
  new = 64
  if args.side == "jft":
    import jft
    from jft.models import generate as gen
    model, params = jft.load_pretrained(args.folder)

    def run():
      out = gen.generate(model, params, prompts.tolist(), gen.Sampling(max_new_tokens=new))
      assert all(len(o) == new for o in out), [len(o) for o in out]
  else:
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    ids = torch.as_tensor(prompts)

    def run():
      with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
      assert out.shape[1] == 32 + new

  start = time.perf_counter()
  run()  # the first call compiles (jft) or warms up (torch)
  first_s = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return {"tokens_per_s": args.batch * new / statistics.median(times), "first_s": first_s,
          "rss_mib": peak_rss_mib()}


WORKERS = {"setup": worker_setup, "jft": worker_jft, "peer": worker_peer, "gemm": worker_gemm,
           "compile": worker_compile, "generate": worker_generate}


# ----------------------------------------------------------------------------
# The orchestrator
# ----------------------------------------------------------------------------

def spawn(kind: str, jft_path: str | None = None, **kw) -> dict:
  """Run one worker in a fresh interpreter and return its JSON record (or {"error": ...}).

  `jft_path`: import jft from that source tree instead (the `--baseline` side).
  """
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind]
  for k, v in kw.items():
    cmd += [f"--{k.replace('_', '-')}", str(v)]
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TF_CPP_MIN_LOG_LEVEL="3")
  tree = jft_path or os.path.dirname(HERE)
  if kind in ("jft", "compile", "generate", "gemm") and kw.get("side", "jft") == "jft" and \
      any(os.path.exists(os.path.join(tree, "jft", *p)) for p in (("host_memory.py",), ("cli", "host_memory.py"))):
    from jft.cli import host_memory
    env = host_memory.environment(env)  # as that revision's `jft train` runs; the peer gains nothing from it
  if jft_path:
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(jft_path), env.get("PYTHONPATH", "")])
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " / ".join(tail)[-300:] or f"exit {proc.returncode}"}
  return json.loads(lines[-1])


def step_flops(shape: Shape, cell: Cell, trainable: int) -> float:
  """Model FLOPs of one step: 6 N T for full fine-tuning, 4 N T + 6 N_trainable T otherwise.

  N counts every matmul weight (output projection included), T the tokens
  (virtual ones included); attention scores are left out, as in the reference.
  """
  n = shape.linear_params()
  tokens = shape.batch * (shape.length + (cell.virtual_tokens if cell.method == "prompt" else 0))
  return (6 * n if cell.method == "full" else 4 * n + 6 * trainable) * tokens


def versions() -> str:
  from importlib import metadata
  names = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "bitsandbytes")
  found = []
  for n in names:
    try:
      found.append(f"{n} {metadata.version(n)}")
    except metadata.PackageNotFoundError:
      found.append(f"{n} -")
  return ", ".join(found)


def cpu_name() -> str:
  """Model name and the vector extensions that decide GEMM speed (AVX-512 BF16 / AMX: torch's fast bf16)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return platform.processor() or "unknown CPU"
  field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                            if line.startswith(key)), "")
  wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
  flags = [f for f in wanted if f in field("flags").split()]
  return f"{field('model name') or 'unknown CPU'} ({' '.join(flags) or 'no AVX2'})"


class Report:
  """results.md, rewritten after every measurement so an interrupted race keeps what it measured."""

  def __init__(self, path: str, args):
    self.path, self.args = path, args
    self.rows, self.gemm, self.peer_gemm, self.compile, self.generate, self.notes = [], {}, {}, [], [], []

  def roofline(self, model: str, dtype: str) -> float | None:
    rates = [v for k, v in self.gemm.get(model, {}).items() if k.startswith(dtype)]
    return max(rates) if rates else None

  def write(self):
    a = self.args
    lines = [
        "# jft vs the PyTorch peer: training and decoding side by side",
        "",
        f"Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {cpu_name()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; {versions()}.",
        f"Threads: torch.set_num_threads({a.threads}); XLA uses every core. Each cell: {a.warmup} warm-up + "
        f"{a.steps} timed steps per side and process (fewer past {a.budget:.0f} s; `steps` says how many "
        f"in all), {a.rounds} process(es) per side in A B B A order, median step time over them; each side "
        "in its own process, jft and the peer alternating. Ratio = jft tokens/s / peer tokens/s (> 1: jft is "
        "faster). MFU = model FLOPs "
        "(6 N T full, 4 N T + 6 N_trainable T otherwise; N = every matmul weight) / step time / the best "
        "JAX GEMM rate of this run in the cell's dtype. Peak RSS = the process's ru_maxrss. jft trains with "
        "its default remat (`model.remat`, `dots`: matmul outputs kept, elementwise work recomputed); torch "
        "keeps what autograd saves. jft's processes run under the glibc tunable `jft train` sets "
        "(`jft.cli.host_memory`: huge pages for XLA's per-step temporaries); the peer's under the system's defaults "
        "(the tunable left its step unchanged in an A/B).",
        "",
        "## Training steps",
        "",
        "| model | cell | trainable | jft tok/s | peer tok/s | ratio | jft MFU | jft compile s | "
        "jft RSS MiB | peer RSS MiB | loss jft / peer | steps jft / peer |" + (
            " baseline tok/s | jft / baseline | baseline RSS MiB |" if a.baseline else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if a.baseline else ""),
    ]
    if a.baseline:
      lines[3] += (f" Baseline = jft imported from `{a.baseline}` (another revision), run as its `jft` command "
                   "would run it.")
    lines += self.rows
    lines += ["", "## GEMM rate (GFLOP/s, median of 9 after 2 warm-ups; jft's side under its tunable)", ""]
    for side, table in (("JAX", self.gemm), ("torch", self.peer_gemm)):
      for model, rates in table.items():
        lines.append(f"- {side}, {model} shapes: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    if self.compile:
      lines += ["", "## Compile time of jft's LoRA-all step against depth (scan over layers)", "",
                "| model | layers | compile s |", "|---|---:|---:|"] + self.compile
    if self.generate:
      lines += ["", "## Greedy decoding, 32-token prompts, 64 new tokens (fp32)", "",
                "| model | batch | jft tok/s | peer tok/s | ratio | jft first call s |",
                "|---|---:|---:|---:|---:|---:|"] + self.generate
    if self.notes:
      lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
    kept = ""  # the workload races' section (benchmarks/workloads.py) outlives a rewrite of the step race
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = f.read().partition("\n## Workloads\n")[2]
    with open(self.path, "w") as f:
      f.write("\n".join(lines) + "\n" + (f"\n## Workloads\n{kept}" if kept else ""))


def parse_ratios(path: str) -> dict:
  """(model, cell) -> ratio from a results.md; decoding rows as (model, 'generate bN')."""
  ratios = {}
  section = None
  with open(path) as f:
    for line in f:
      if line.startswith("## "):
        section = line[3:].strip()
      cols = [c.strip() for c in line.strip().strip("|").split("|")]
      if not line.startswith("|") or len(cols) < 5 or cols[0] in ("model", "") or set(cols[0]) <= set("-"):
        continue
      if section == "Training steps":
        key, value = (cols[0], cols[1]), cols[5]
      elif section and section.startswith("Greedy decoding"):
        key, value = (cols[0], f"generate b{cols[1]}"), cols[4]
      else:
        continue
      try:
        ratios[key] = float(value.rstrip("x"))
      except ValueError:
        pass
  return ratios


def compare(old: dict, new: dict, tolerance: float = 0.10) -> list[str]:
  """Every ratio (`parse_ratios`) that fell by more than `tolerance` against the previous results."""
  worse = []
  for key in sorted(old.keys() & new.keys()):
    if new[key] < old[key] * (1 - tolerance):
      worse.append(f"{key[0]} {key[1]}: ratio {old[key]:.2f} -> {new[key]:.2f} "
                   f"({(new[key] / old[key] - 1) * 100:+.0f}%)")
  return worse


def race(args):
  models = args.models.split(",")
  cells = list(CELLS) if args.cells == "all" else args.cells.split(",")
  for name in models + cells:
    if name not in SHAPES and name not in CELLS:
      sys.exit(f"unknown model or cell {name!r}; models: {sorted(SHAPES)}, cells: {sorted(CELLS)}")
  previous = parse_ratios(args.compare) if args.compare else None  # read first: --out may overwrite it
  report = Report(args.out, args)
  say = lambda msg: print(msg, file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    for model in models:
      shape = SHAPES[model]
      folder = os.path.join(tmp, model)
      setup = spawn("setup", model=model, folder=folder)
      if "error" in setup:
        sys.exit(f"could not write the {model} checkpoint: {setup['error']}")
      say(f"{model}: {setup['params']:,} parameters, batch {shape.batch} x {shape.length}")
      report.gemm[model] = spawn("gemm", model=model, side="jft").get("gflops", {})
      report.peer_gemm[model] = spawn("gemm", model=model, side="peer", threads=args.threads).get("gflops", {})
      tokens = shape.batch * shape.length
      for i, cell_name in enumerate(cells):
        cell = CELLS[cell_name]
        sides = ["jft", "peer"] + (["baseline"] if args.baseline else [])
        sides = sides[i % len(sides):] + sides[:i % len(sides)]  # rotate who goes first
        runs = {side: [] for side in sides}
        for r in range(args.rounds):  # A B B A ...: a machine that drifts within a cell moves every side alike
          for side in sides if r % 2 == 0 else sides[::-1]:
            say(f"  {cell_name} {side} ...")
            runs[side].append(spawn("jft" if side == "baseline" else side,
                                    jft_path=args.baseline if side == "baseline" else None, model=model,
                                    cell=cell_name, folder=folder, steps=args.steps, warmup=args.warmup,
                                    threads=args.threads, budget=args.budget))
        got = {side: pooled(records) for side, records in runs.items()}
        report.rows.append(row(model, cell_name, cell, shape, tokens, got, report))
        say("  " + report.rows[-1])
        report.write()
      if not args.skip_extras:
        for layers in (shape.layers, 4 * shape.layers) if model in ("small", "tiny") else ():
          r = spawn("compile", model=model, layers=layers)
          report.compile.append(f"| {model} | {layers} | {r.get('compile_s', float('nan')):.1f} |")
          report.write()
        for batch in (1,) if args.quick else (1, 8):
          got = {side: spawn("generate", model=model, folder=folder, side=side, batch=batch,
                             steps=1 if args.quick else 3,
                             threads=args.threads) for side in ("jft", "peer")}
          j, p = (got[s].get("tokens_per_s", float("nan")) for s in ("jft", "peer"))
          report.generate.append(f"| {model} | {batch} | {j:.1f} | {p:.1f} | {j / p:.2f} | "
                                 f"{got['jft'].get('first_s', float('nan')):.1f} |")
          for side in got:
            if "error" in got[side]:
              report.notes.append(f"{model} generate b{batch} {side}: {got[side]['error']}")
          report.write()
  if args.compare:
    worse = compare(previous, parse_ratios(args.out))
    report.notes.append(f"Against {args.compare}: " + ("; ".join(worse) if worse else
                                                        "no ratio fell by more than 10%."))
    report.write()
    for w in worse:
      say("WORSE: " + w)
  say("--quick: the report follows on stdout (pass --out to keep it)" if getattr(args, "printed", False) else
      f"wrote {args.out}")


def pooled(records: list) -> dict:
  """One side's processes of a cell (`--rounds`) as one record: every timed step, the highest RSS."""
  failed = [r for r in records if "error" in r]
  if failed:
    return failed[0]
  return {**records[0], "times": [t for r in records for t in r["times"]],
          "rss_mib": max(r["rss_mib"] for r in records),
          "compile_s": statistics.median(r["compile_s"] for r in records)}


def row(model, cell_name, cell, shape, tokens, got, report) -> str:
  errors = [f"{side}: {r['error']}" for side, r in got.items() if "error" in r]
  if errors:
    report.notes.append(f"{model} {cell_name}: " + "; ".join(errors))
  j, p = got.get("jft", {}), got.get("peer", {})
  jt = tokens / statistics.median(j["times"]) if "times" in j else float("nan")
  pt = tokens / statistics.median(p["times"]) if "times" in p else float("nan")
  roof = report.roofline(model, "bfloat16" if cell.bf16 else "float32")  # bf16 storage computes in fp32
  mfu = (step_flops(shape, cell, j.get("trainable", 0)) * jt / tokens / (roof * 1e9)) if roof and "times" in j \
      else float("nan")
  line = (f"| {model} | {cell_name} | {j.get('trainable', p.get('trainable', 0)):,} | {jt:.0f} | {pt:.0f} | "
          f"{jt / pt:.2f} | {mfu:.0%} | {j.get('compile_s', float('nan')):.1f} | {j.get('rss_mib', 0):.0f} | "
          f"{p.get('rss_mib', 0):.0f} | {j.get('loss0', float('nan')):.3f} / {p.get('loss0', float('nan')):.3f} | "
          f"{len(j.get('times', []))} / {len(p.get('times', []))} |")
  if "baseline" in got:
    b = got["baseline"]
    bt = tokens / statistics.median(b["times"]) if "times" in b else float("nan")
    line += f" {bt:.0f} | {jt / bt:.2f} | {b.get('rss_mib', 0):.0f} |"
  return line


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", help=f"comma-separated names of MODELS (default {','.join(MODELS)})")
  parser.add_argument("--cells", help="comma-separated names of CELLS, or all (default)")
  parser.add_argument("--steps", type=int, help="timed steps per cell and side (default 5)")
  parser.add_argument("--warmup", type=int, help="default 2")
  parser.add_argument("--rounds", type=int, default=1,
                      help="processes per side and cell, in A B B A order; their timed steps are pooled")
  parser.add_argument("--budget", type=float, default=150.0,
                      help="seconds of steps per side and cell before it stops early")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--out", help="the report (default benchmarks/results.md; with --quick: printed only)")
  parser.add_argument("--compare", help="a previous results.md: flag every ratio that fell by more than 10%%")
  parser.add_argument("--skip-extras", action="store_true", help="only the training cells")
  parser.add_argument("--baseline", help="a jft source tree of another revision (e.g. a `git worktree`): a third "
                      "side, to measure what a change bought")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: the tiny model, one cell (lora-all), 1 warm-up + 1 timed step, decoding at "
                           "batch 1; the report is printed, not written (unless --out)")
  # worker arguments
  parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  for name in ("model", "cell", "folder", "side"):
    parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
  for name in ("layers", "batch"):
    parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
  import workloads  # benchmarks/ is this script's folder
  workloads.add_arguments(parser)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(WORKERS[args.worker](args)), flush=True)
    return
  if args.workload:
    try:
      print(workloads.race(args), end="")
    except workloads.RaceError as e:
      sys.exit(f"race.py --workload {args.workload}: error: {e}")
    return
  defaults = QUICK if args.quick else dict(models=",".join(MODELS), cells="all", steps=5, warmup=2)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.out or not args.quick:
    args.out = args.out or os.path.join(HERE, "results.md")
    race(args)
    return
  with tempfile.TemporaryDirectory() as tmp:  # --quick: nothing written that outlives the run
    args.out, args.printed = os.path.join(tmp, "results.md"), True
    race(args)
    with open(args.out) as f:
      print(f.read(), end="")


if __name__ == "__main__":
  main()
