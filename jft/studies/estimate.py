"""What a train step costs before running it: an analytical model (memory, FLOPs, time, price) from
the config's shapes alone (`analytic`), checked against the compiled step's memory (`jft.run.memory`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp

from jft import config as cfg
from jft import objectives, peft, quant, run
from jft.config import schema
from jft.core import rules
from jft.core.errors import JftError
from jft.models import head as fused  # `head` names the output projection here
from jft.models import hf
from jft.models.pretrained import model_config
from jft.models.transformer import causal_blocks
# The compiled step's memory lived here before jft.run.memory; the names still answer.
from jft.run.memory import (compile_step, compiled_step_memory, memory_of, sharded_step_memory,  # noqa: F401
                            step_memory)


# ----------------------------------------------------------------------------
# The analytical model: memory, FLOPs, time and cost from the config alone.
#
# Nothing is allocated and nothing is compiled: the model's ModelConfig comes
# from the checkpoint's metadata (config.json, GGUF header), params, method
# leaves and optimizer state are `jax.eval_shape`d, and every other term is a
# formula over the dimensions. `tests/test_estimate.py` holds the formulas to
# XLA's memory analysis of the compiled step (within 15%) and to a hand count
# of the FLOPs (exactly).
# ----------------------------------------------------------------------------

class EstimateError(JftError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  peak_flops: dict  # compute dtype -> dense matmul FLOP/s of one chip at the precision JAX uses by default
  memory_bytes: int  # of one chip
  price_per_hour: float  # USD, typical on-demand, one chip; edit with --price-per-hour
  source: str


GiB = 2**30
# Peak dense (no sparsity) FLOP/s per chip. float32 matmuls run at JAX's default precision:
# TF32 on A100/H100/H200, one bf16 pass on TPU. Prices: typical 2024 on-demand list prices per chip-hour.
HARDWARE = {
    # No measurement (nothing is run): a nominal 100 GFLOP/s for a few-core AVX2 machine, memory = this host's RAM.
    "cpu": Hardware("cpu", {"float32": 1e11, "bfloat16": 1e11}, 0, 0.0, "nominal constant, not measured"),
    # NVIDIA A100 datasheet (SXM 80GB): BF16 312 TFLOP/s, TF32 156 TFLOP/s dense, 80 GB HBM2e. Lambda on-demand ~$1.79/h.
    "a100-80g": Hardware("a100-80g", {"float32": 156e12, "bfloat16": 312e12}, 80 * GiB, 1.79,
                         "NVIDIA A100 datasheet (SXM): 312 TF bf16 / 156 TF tf32 dense"),
    # NVIDIA H100 datasheet (SXM5): BF16 989 TFLOP/s, TF32 495 TFLOP/s dense, 80 GB HBM3. Lambda on-demand ~$2.99/h.
    "h100-80g": Hardware("h100-80g", {"float32": 495e12, "bfloat16": 989e12}, 80 * GiB, 2.99,
                         "NVIDIA H100 datasheet (SXM): 989 TF bf16 / 495 TF tf32 dense"),
    # NVIDIA H200 datasheet: H100's compute, 141 GB HBM3e. Typical on-demand ~$3.50/h.
    "h200": Hardware("h200", {"float32": 495e12, "bfloat16": 989e12}, 141 * 10**9, 3.50,
                     "NVIDIA H200 datasheet: 989 TF bf16 / 495 TF tf32 dense, 141 GB"),
    # Google Cloud TPU v5e docs: 197 TFLOP/s bf16, 16 GiB HBM2; list price $1.20 per chip-hour (us-central1).
    "tpu-v5e": Hardware("tpu-v5e", {"float32": 197e12, "bfloat16": 197e12}, 16 * GiB, 1.20,
                        "Google Cloud TPU v5e docs: 197 TF bf16, 16 GiB"),
}
DEFAULT_UTILIZATION = 0.4  # model FLOPs utilization a tuned fine-tuning step typically reaches


def _host_memory() -> int:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 0


def hardware(name: str) -> Hardware:
  if name not in HARDWARE:
    raise EstimateError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE)}")
  hw = HARDWARE[name]
  return dataclasses.replace(hw, memory_bytes=_host_memory()) if name == "cpu" else hw


@dataclasses.dataclass
class Shapes:
  """What a step's cost depends on, all abstract: the model's dimensions, the method's tree, the batch."""
  model: object  # jft.models.config.ModelConfig
  method: object
  trainable: dict  # abstract (ShapeDtypeStructs)
  frozen: dict
  opt_state: object
  batch: int
  length: int
  remat: str
  dtype_bytes: int  # compute dtype


def shapes(config) -> Shapes:
  """Abstract params (quantized as configured), the method's split and the optimizer state of a run config.
  The config is checked against the model's as `jft train` checks it (`schema.validate_against_model`:
  the longest row inside the model's context), so nothing is estimated for a run train refuses."""
  dtype = jnp.dtype(config.model.dtype)
  mc = model_config(config.model.name)
  schema.validate_against_model(config, mc)
  base = hf.abstract_params(mc, dtype)
  if config.quant.format:
    base = quant.abstract_quantize(base, quant.rules_for(config.quant.format), blocksize=config.quant.blocksize,
                                   double_quant=config.quant.double_quant)
  method = objectives.method_of(config)  # with the objective's own part (the reward model's score head)
  trainable, frozen = jax.eval_shape(lambda rng, p: peft.split(method, method.init(rng, p)),
                                     jax.random.PRNGKey(0), base)
  opt_state = jax.eval_shape(run.make_tx(config, trainable, method).init, trainable)
  return Shapes(mc, method, trainable, frozen, opt_state, config.train.batch_size, config.data.max_length,
                config.model.remat, jnp.dtype(dtype).itemsize)


def _nbytes(tree) -> int:
  return sum(int(math.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---- Memory terms -------------------------------------------------------------

def weight_bytes(s: Shapes) -> dict:
  """Bytes of all params by storage: float32 / bfloat16 arrays, 4-bit (or int8) codes and their block scales."""
  out = {"float32": 0, "bfloat16": 0, "quant_codes": 0, "quant_scales": 0}
  flat = rules.flatten(peft.combine(s.trainable, s.frozen))
  for leaf in flat.values():
    if quant.is_quantized(leaf):
      out["quant_codes"] += _nbytes(leaf.codes)
      out["quant_scales"] += _nbytes([a for a in (leaf.absmax, leaf.absmax_codes, leaf.absmax_scale,
                                                  leaf.absmax_offset) if a is not None])
    else:
      key = leaf.dtype.name if leaf.dtype.name in out else "float32"
      out[key] += int(math.prod(leaf.shape)) * leaf.dtype.itemsize
  return out


def gradient_bytes(s: Shapes) -> int:
  """One gradient per trainable leaf, in the leaf's dtype (frozen leaves get none)."""
  return _nbytes(s.trainable)


def optimizer_bytes(s: Shapes) -> int:
  """The optimizer state as optax builds it (adamw: 2x trainable, sgd momentum: 1x, adafactor: factored)."""
  return _nbytes(s.opt_state)


def _prompt_tokens(s: Shapes) -> int:
  """Vectors prepended to every sequence (prompt tuning, P-tuning): the layers run on T + n tokens."""
  t = rules.flatten(s.trainable)
  return next((v.shape[0] for p, v in t.items() if p in ("prompt/embeddings", "ptuning/embedding")), 0)


def _prefix_keys(s: Shapes) -> int:
  """Extra keys every query sees (prefix tuning)."""
  t = rules.flatten(s.trainable)
  return next((v.shape[-2] for p, v in t.items() if p.endswith("/prefix/keys")), 0)


def attention_pairs(s: Shapes) -> int:
  """(query, key) pairs one sequence's attention computes: the causal blocks the model uses skip the
  keys after each block's last query (`jft.models.transformer.causal_blocks`)."""
  t = s.length + _prompt_tokens(s)
  keys = t + _prefix_keys(s)
  return sum((end - start) * (keys - t + end) for start, end in causal_blocks(t))


def _has(flat: dict, prefix: str) -> bool:
  return any(p.startswith(prefix) for p in flat)


def layer_residual_bytes(s: Shapes) -> int:
  """What one layer keeps for its backward pass without remat, per the autodiff of `Block`:
  the residual stream (input, after attention), q/k/v after rotary, the attention output, the masked
  scores and the probabilities (float32), the MLP's intermediates (gated: gate, up, act(gate), its
  derivative's input, product), plus the inputs of linears whose weights (or adapter matrices) train,
  the normalised inputs of trainable norm scales, LoRA's x @ a and IA3's scaled activations."""
  c, a = s.model, s.dtype_bytes
  n = s.batch * (s.length + _prompt_tokens(s))
  d, f, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  t = rules.flatten(s.trainable)
  elems = 2 * n * d + n * (q + 2 * kv) + n * q + (5 if c.mlp == "gated" else 2) * n * f
  scores = 2 * 4 * s.batch * c.num_heads * attention_pairs(s)
  trains = lambda *mods: any(_has(t, f"layers/{m}/kernel") or _has(t, f"layers/{m}/lora/") for m in mods)
  elems += n * d * trains("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj")
  elems += n * d * trains("mlp/gate_proj", "mlp/up_proj")
  elems += n * f * trains("mlp/down_proj")
  elems += n * d * sum(_has(t, f"layers/{m}/scale") for m in ("input_layernorm", "post_attention_layernorm"))
  for path, leaf in t.items():
    if path.startswith("layers/") and path.endswith("/lora/a"):
      elems += n * leaf.shape[-1]
    elif path.startswith("layers/") and path.endswith("/ia3/output"):
      elems += n * leaf.shape[-1]
  return elems * a + scores


def activation_bytes(s: Shapes) -> int:
  """Saved residuals of all layers: every layer's (remat none), only each layer's input (full: the
  backward recomputes one layer at a time, `layer_workspace_bytes`), or the matmul outputs (dots)."""
  c = s.model
  n = s.batch * (s.length + _prompt_tokens(s))
  if s.remat == "none":
    return c.num_layers * layer_residual_bytes(s)
  carries = c.num_layers * n * c.hidden_size * s.dtype_bytes
  if s.remat == "full":
    return carries
  # dots: the q/k/v, o_proj and gate/up products and attention's two (scores, probs @ v); norms,
  # rotary, softmax and activations are recomputed, and down_proj's output only feeds the next carry.
  # dots_no_batch recomputes attention's batched products too.
  q, kv, f = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
  dots = n * (q + 2 * kv + c.hidden_size + 2 * f) * s.dtype_bytes
  if s.remat == "dots":
    dots += n * q * s.dtype_bytes + 4 * s.batch * c.num_heads * attention_pairs(s)
  return carries + c.num_layers * dots


def layer_workspace_bytes(s: Shapes) -> int:
  """The backward pass of one layer: the cotangents of its scores/probabilities, MLP and residual stream,
  or under remat its recomputed residuals, whichever is larger (each residual is freed as the
  cotangent that replaces it is made)."""
  c = s.model
  n = s.batch * (s.length + _prompt_tokens(s))
  cot = 2 * 4 * s.batch * c.num_heads * attention_pairs(s) + 2 * n * (c.intermediate_size + c.hidden_size) * 4
  return max(cot, layer_residual_bytes(s) if s.remat != "none" else 0)


def head(s: Shapes):
  """The output projection the loss uses (`jft.models.head.output_head`), or None when it goes through logits."""
  return fused.output_head(peft.combine(s.trainable, s.frozen))


def head_bytes(s: Shapes) -> int:
  """Temporaries of the output head and loss. Fused (`jft.models.head.head_loss`): a chunk's float32 logits
  and their gradient, plus the input's gradient [B, T, d] it saves for the backward pass (and, when a
  bfloat16 head trains, its float32 gradient accumulator). Logits path: the logits, their softmax and
  their gradient, [B, T, vocab] float32 each."""
  c = s.model
  h = head(s)
  if h is None:
    return 3 * 4 * s.batch * s.length * c.vocab_size
  chunk = fused._chunk_length(s.batch, s.length, c.vocab_size)
  out = 2 * 4 * s.batch * chunk * c.vocab_size + 4 * s.batch * s.length * c.hidden_size
  w = rules.flatten(s.trainable).get(h.path)
  if w is not None and w.dtype != jnp.float32:  # a float32 head's accumulator is its gradient (counted there)
    out += 4 * c.vocab_size * c.hidden_size
  return out


def batch_bytes(s: Shapes) -> int:
  """input_ids and attention_mask, int32."""
  return 2 * 4 * s.batch * s.length


# ---- FLOPs --------------------------------------------------------------------

def _linear_kernels(s: Shapes) -> dict:
  """path -> (params, trains) of every matmul weight of the model (layer kernels stacked on [L])."""
  t, f = rules.flatten(s.trainable), rules.flatten(s.frozen)
  return {p: (int(math.prod(v.shape)), p in t) for p, v in {**f, **t}.items()
          if p.startswith("layers/") and p.endswith("/kernel")}


def linear_flops_per_token(s: Shapes) -> int:
  """Layer linears: forward 2 flops/param, input gradient 2, weight gradient 2 only when the weight trains
  (a frozen linear costs 4 flops/param/token, a trained one 6)."""
  return sum((6 if trains else 4) * n for n, trains in _linear_kernels(s).values())


def adapter_flops_per_token(s: Shapes) -> int:
  """Trained matrices applied to every token (LoRA's a and b, bottleneck adapters): 6 flops/param/token.
  Methods that build a weight delta once per step (LoHa, LoKr, VeRA, DoRA's norm) add no per-token term
  here: their per-step products are small and not counted."""
  out = 0
  for path, leaf in rules.flatten(s.trainable).items():
    if path.startswith("layers/") and leaf.ndim >= 3 and ("/lora/" in path or "/bottleneck/" in path):
      out += 6 * int(math.prod(leaf.shape))
  return out


def attention_flops_per_step(s: Shapes) -> int:
  """Scores q.k and the weighted sum p.v over the (query, key) pairs of the causal blocks: 2 * head_dim
  flops per pair and head each in the forward pass, twice that in the backward (both operands' gradients)."""
  c = s.model
  return 3 * 2 * 2 * c.num_heads * c.head_dim * attention_pairs(s) * s.batch


def head_flops_per_step(s: Shapes) -> int:
  """Output projection over B x T positions (fused: padded up to whole chunks): logits 2*d*vocab per
  position, input gradient 2*d*vocab, weight gradient 2*d*vocab when the head trains."""
  c = s.model
  h = head(s)
  t = s.length
  if h is not None:
    chunk = fused._chunk_length(s.batch, s.length, c.vocab_size)
    t = -(-s.length // chunk) * chunk
    trains = h.path in rules.flatten(s.trainable)
  else:
    trains = _has(rules.flatten(s.trainable), "lm_head/kernel")
  return (6 if trains else 4) * c.hidden_size * c.vocab_size * s.batch * t


def recompute_flops_per_step(s: Shapes) -> int:
  """Remat full: the backward pass runs each layer's forward again (linears, adapters, attention)."""
  if s.remat != "full":
    return 0
  tokens = s.batch * (s.length + _prompt_tokens(s))
  fwd = sum(2 * n for n, _ in _linear_kernels(s).values()) + adapter_flops_per_token(s) // 3
  return fwd * tokens + attention_flops_per_step(s) // 3


def flops_per_step(s: Shapes) -> dict:
  """Matmul FLOPs of one train step (forward + backward), by term; elementwise work is not counted."""
  tokens = s.batch * (s.length + _prompt_tokens(s))
  out = {"linears": linear_flops_per_token(s) * tokens, "adapters": adapter_flops_per_token(s) * tokens,
         "attention": attention_flops_per_step(s), "head": head_flops_per_step(s),
         "recompute": recompute_flops_per_step(s)}
  out["total"] = sum(out.values())
  return out


# ---- The estimate ---------------------------------------------------------------

@dataclasses.dataclass
class Estimate:
  method: str
  model: str
  hardware: str
  batch: int
  length: int
  remat: str
  dtype: str
  steps: int
  params_total: int
  params_trainable: int
  trainable_percent: float
  memory: dict  # bytes by term, and "total"
  flops: dict  # per step by term, and "total"
  flops_per_token: float
  peak_flops: float
  utilization: float
  step_seconds: float
  run_seconds: float
  price_per_hour: float
  cost: float
  memory_capacity: int
  fits: Optional[bool]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def memory(s: Shapes) -> dict:
  """Peak bytes of a step by term. total = weights + optimizer + batch + saved activations + gradients
  + the larger of the head's temporaries (before the backward pass) and one layer's backward workspace."""
  w = weight_bytes(s)
  out = {f"weights_{k}": v for k, v in w.items()}
  out.update(weights=sum(w.values()), gradients=gradient_bytes(s), optimizer=optimizer_bytes(s),
             activations=activation_bytes(s), head=head_bytes(s), backward_workspace=layer_workspace_bytes(s),
             batch=batch_bytes(s))
  out["total"] = (out["weights"] + out["optimizer"] + out["batch"] + out["activations"] + out["gradients"]
                  + max(out["head"], out["backward_workspace"]))
  return out


def check_settings(utilization: float = DEFAULT_UTILIZATION, price_per_hour: Optional[float] = None):
  """The estimate's own settings, checked before any config is read: a utilization in (0, 1] and a
  positive, finite price (None: the hardware's typical price)."""
  if not 0 < utilization <= 1:
    raise EstimateError(f"--utilization {utilization}: expected a fraction in (0, 1]")
  if price_per_hour is not None and not 0 < price_per_hour < math.inf:
    raise EstimateError(f"--price-per-hour {price_per_hour}: expected a positive price in USD per chip-hour")


def analytic(config, hardware_name: str = "cpu", utilization: float = DEFAULT_UTILIZATION,
             price_per_hour: Optional[float] = None, name: Optional[str] = None) -> Estimate:
  """The cost of the run `config` describes: params, memory, FLOPs, step time and cost, from shapes alone."""
  check_settings(utilization, price_per_hour)
  hw = hardware(hardware_name)
  s = shapes(config)
  counts = peft.count(s.method, peft.combine(s.trainable, s.frozen))
  mem = memory(s)
  flops = flops_per_step(s)
  peak = hw.peak_flops[config.model.dtype]
  step_seconds = flops["total"] / (peak * utilization)
  price = hw.price_per_hour if price_per_hour is None else price_per_hour
  run_seconds = step_seconds * config.train.steps
  tokens = s.batch * s.length
  return Estimate(
      method=name or config.method.name + (f" on a {config.quant.format} base" if config.quant.format else ""),
      model=config.model.name, hardware=hw.name, batch=s.batch,
      length=s.length, remat=s.remat, dtype=config.model.dtype, steps=config.train.steps,
      params_total=counts.total, params_trainable=counts.trainable, trainable_percent=counts.percent,
      memory=mem, flops=flops, flops_per_token=flops["total"] / tokens, peak_flops=peak,
      utilization=utilization, step_seconds=step_seconds, run_seconds=run_seconds, price_per_hour=price,
      cost=run_seconds / 3600 * price, memory_capacity=hw.memory_bytes,
      fits=None if not hw.memory_bytes else mem["total"] <= hw.memory_bytes)


# ---- Configs and reports ------------------------------------------------------------

def method_configs(spec: str, overrides=()) -> dict:
  """method -> resolved config, for every row of the config file's `methods()` table (aliases skipped):
  the file's argument with `method=NAME`, then the command-line overrides."""
  path, _, arg = spec.partition(":")
  cfg.load_config(spec)  # the file and its argument are valid as given
  module = cfg.load_module(path)
  if not hasattr(module, "methods"):
    raise EstimateError(f"{path}: defines no methods() table, so --all-methods has nothing to compare")
  items = [i for i in arg.split(",") if i.strip() and i.split("=", 1)[0].strip() != "method"]
  return {name: cfg.build(f"{path}:{','.join(items + [f'method={name}'])}", overrides)
          for name in module.methods() if name not in peft.ALIASES}


def _size(b: float) -> str:
  return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
  return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
      f"{seconds / 3600:.1f} h"


def report(e: Estimate) -> str:
  """The estimate of one run as a short text report."""
  m, f = e.memory, e.flops
  hw = HARDWARE[e.hardware]
  lines = [
      f"{e.model}, method {e.method}: batch {e.batch} x {e.length} tokens, {e.dtype}, remat {e.remat}, {e.steps} steps",
      f"params: {e.params_total:,} total, {e.params_trainable:,} trainable ({e.trainable_percent:.4f}%)",
      "memory (estimated peak of one step):",
      *(f"  weights {k[len('weights_'):]:<13} {_size(m[k])}" for k in
        ("weights_float32", "weights_bfloat16", "weights_quant_codes", "weights_quant_scales") if m[k]),
      f"  gradients             {_size(m['gradients'])}  (trainable leaves only)",
      f"  optimizer state       {_size(m['optimizer'])}",
      f"  activations           {_size(m['activations'])}  (saved for the backward pass, remat {e.remat})",
      f"  head/loss temporaries {_size(m['head'])}",
      f"  backward workspace    {_size(m['backward_workspace'])}  (one layer; the larger of this and the head counts)",
      f"  total                 {_size(m['total'])}",
      f"FLOPs: {e.flops_per_token / 1e6:,.2f} MFLOP/token, {f['total'] / 1e12:,.3f} TFLOP/step (linears "
      f"{f['linears'] / 1e12:.3f}, adapters {f['adapters'] / 1e12:.3f}, attention {f['attention'] / 1e12:.3f}, "
      f"head {f['head'] / 1e12:.3f}, remat recompute {f['recompute'] / 1e12:.3f})",
      f"time on {e.hardware} ({hw.source}): {e.peak_flops / 1e12:g} TFLOP/s peak x {e.utilization:.0%} utilization "
      f"-> {e.step_seconds:.3g} s/step, {_duration(e.run_seconds)} for {e.steps} steps",
      f"cost: ${e.cost:,.2f} at ${e.price_per_hour:.2f}/h (typical on-demand price, edit with --price-per-hour)",
  ]
  return "\n".join(lines)


def table(estimates: dict) -> str:
  """Methods side by side, one Markdown table."""
  rows = ["| method | trainable | trainable % | weights | grads | optimizer | activations | head | total | "
          "GFLOP/step | s/step | run | cost |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, e in estimates.items():
    m = e.memory
    rows.append(f"| {name} | {e.params_trainable:,} | {e.trainable_percent:.3f} | {_size(m['weights'])} | "
                f"{_size(m['gradients'])} | {_size(m['optimizer'])} | {_size(m['activations'])} | {_size(m['head'])} | "
                f"{_size(m['total'])} | {e.flops['total'] / 1e9:,.1f} | {e.step_seconds:.3g} | "
                f"{_duration(e.run_seconds)} | ${e.cost:,.2f} |")
  return "\n".join(rows)


def memory_warning(e: Estimate) -> Optional[str]:
  if e.fits is False:
    return (f"warning: {e.method} needs about {_size(e.memory['total'])}, more than the "
            f"{_size(e.memory_capacity)} of one {e.hardware}")
  return None
