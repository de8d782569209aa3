"""`jft estimate`: the analytical step model against XLA's memory analysis and a hand count of FLOPs.

The models here are described by a config.json alone (no weights): the estimate
reads only shapes, and the reference step is compiled from abstract params.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from jft.studies import estimate
from jft import quant, run
from jft.models import sharding
from jft.core import rules
from jft.run import memory, state
from jft.cli import main
from jft.config import default_config
from jft.models import hf
from jft.models.transformer import DEFAULT_REMAT, Transformer
from jft.run.step import make_train_step

# A: the tiny Llama of `tiny_model` (SmolLM2's 49k vocab on 2 x 32 layers: the output head dominates).
# B: 4 layers x 128 hidden, 2k vocab, untied head (the layers' saved activations dominate).
SHAPES = {
    "A": dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "B": dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
    "F": dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False),
}
BATCH = {"A": (4, 48), "B": (8, 128), "F": (2, 16)}
METHODS = {"full": ("full", {}, ""), "lora": ("lora", {"rank": 8}, ""), "qlora": ("lora", {"rank": 8}, "nf4"),
           "ia3": ("ia3", {}, ""), "prompt": ("prompt", {"num_virtual_tokens": 16}, "")}
# README: the estimate is "within 6.6% of XLA's analysis of the compiled step for full FT, LoRA, QLoRA, IA3 and
# prompt tuning on two model shapes with remat dots (the default) and full, 8.0% without remat": the largest
# |error| of those cases printed to 0.1% (the README once said 7.1% for all three; full FT without remat is
# -8.0%). Remat dots_no_batch is outside that claim: the earlier 15%.
TOLERANCE = 0.0665
TOLERANCE_BY_REMAT = {"none": 0.0805}
TOLERANCE_OUTSIDE_THE_CLAIM = 0.15


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """shape -> a model folder holding only config.json."""
  out = {}
  for name, fields in SHAPES.items():
    folder = tmp_path_factory.mktemp(f"shape_{name}")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **fields}))
    out[name] = str(folder)
  return out


def make_config(folder, shape, method, remat=DEFAULT_REMAT):
  name, hparams, fmt = METHODS[method]
  c = default_config()
  c.model.update(name=folder, remat=remat)
  c.method.name = name
  c.method.hparams = hparams
  c.quant.update(format=fmt, blocksize=32)  # 32 divides every input width of shape A, so NF4 rows stay whole
  c.train.batch_size, c.data.max_length = BATCH[shape]
  return c


def compiled_memory(c) -> dict:
  """XLA's memory analysis of the compiled train step of config `c` (abstract params, nothing run)."""
  s = estimate.shapes(c)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[c.model.dtype]
  model = Transformer(s.model, dtype=dtype, param_dtype=dtype, remat=c.model.remat)
  base = hf.abstract_params(s.model, dtype)
  if c.quant.format:
    base = quant.abstract_quantize(base, ((r"layers/.*/kernel", c.quant.format),), blocksize=c.quant.blocksize)
  st = state.describe(s.method, base, sharding.make_mesh({"data": -1}), make_tx=lambda t: run.make_tx(c, t, s.method))
  step = make_train_step(model, s.method, st.tx, shardings=st.step_shardings())
  return memory.compiled_step_memory(step, st, c.train.batch_size, c.data.max_length)


def _check_memory(folders, shape, method, remat, tolerance=TOLERANCE):
  c = make_config(folders[shape], shape, method, remat)
  est = estimate.memory(estimate.shapes(c))
  xla = compiled_memory(c)
  # weights + optimizer state + batch are the step's arguments: exact, not estimated
  assert est["weights"] + est["optimizer"] + est["batch"] == pytest.approx(xla["arguments"], rel=0.01)
  err = est["total"] / xla["total"] - 1
  print(f"{shape} {method} remat={remat}: estimate {est['total'] / 2**20:.2f} MiB, "
        f"XLA {xla['total'] / 2**20:.2f} MiB ({err:+.1%})")
  assert abs(err) <= tolerance, f"{shape} {method} remat={remat}: {err:+.1%}, claimed within {tolerance:.2%}"


# Four methods over two shapes by default (full FT and QLoRA on A, LoRA and IA3 on B); the other
# four pairs are slow (each case compiles a step).
_SLOW_PAIRS = {("A", "lora"), ("A", "ia3"), ("B", "full"), ("B", "qlora")}


@pytest.mark.parametrize("shape,method", [
    pytest.param(s, m, marks=[pytest.mark.slow] if (s, m) in _SLOW_PAIRS else [])
    for s in ("A", "B") for m in ("full", "lora", "qlora", "ia3")])
def test_memory_within_6_6_percent_of_compiled_step(folders, shape, method):
  _check_memory(folders, shape, method, DEFAULT_REMAT)


@pytest.mark.slow
@pytest.mark.parametrize("method,remat", [("prompt", "none"), ("full", "none"), ("lora", "none"), ("full", "full"),
                                          ("lora", "full"), ("qlora", "full"), ("prompt", "full"),
                                          ("lora", "dots_no_batch")])
def test_memory_more_cases(folders, method, remat):
  _check_memory(folders, "B", method, remat,
                TOLERANCE_BY_REMAT.get(remat, TOLERANCE) if remat in (DEFAULT_REMAT, "none", "full")
                else TOLERANCE_OUTSIDE_THE_CLAIM)


def test_flops_match_hand_count(folders):
  # shape F: vocab 101, d 32, ffn 64, 2 layers, 4 heads of 8 (q 32 wide), 2 kv heads (k, v 16 wide),
  # untied head; batch 2 x 16 tokens = 32 tokens; one causal block (16 < 128) -> 16 * 16 = 256 pairs.
  L, d, f, V, q, kv, tokens, pairs, b = 2, 32, 64, 101, 32, 16, 32, 256, 2
  linear_params = L * (d * q + d * kv + d * kv + q * d + d * f + d * f + f * d)  # q k v o gate up down
  attention = 3 * (2 * 2 * 4 * 8 * pairs * b)  # (q.k + p.v) forward, twice that backward
  lora = make_config(folders["F"], "F", "lora")
  lora.method.hparams = {"rank": 4}  # targets q_proj, v_proj
  lora_params = L * (4 * (d + q) + 4 * (d + kv))
  want = 4 * linear_params * tokens + 6 * lora_params * tokens + attention + 4 * d * V * tokens
  assert want == 3141632
  assert estimate.flops_per_step(estimate.shapes(lora))["total"] == want
  # full fine-tuning: every weight's gradient too (6 flops/param/token), the head included
  full = make_config(folders["F"], "F", "full")
  assert estimate.flops_per_step(estimate.shapes(full))["total"] == \
      6 * linear_params * tokens + attention + 6 * d * V * tokens


def test_cli_json(folders, capsys):
  rc = main(["estimate", "--config", "configs/tiny.py:method=lora", f"--config.model.name={folders['B']}",
             "--hardware", "h100-80g", "--price-per-hour", "2.0", "--json"])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  assert out["method"] == "lora" and out["hardware"] == "h100-80g" and out["price_per_hour"] == 2.0
  for key in ("weights", "gradients", "optimizer", "activations", "head", "total"):
    assert out["memory"][key] >= 0
  assert 0 < out["trainable_percent"] < 100 and out["flops"]["total"] > 0 and out["fits"] is True
  assert out["cost"] == pytest.approx(out["run_seconds"] / 3600 * 2.0)
  assert out["step_seconds"] == pytest.approx(out["flops"]["total"] / (0.4 * 495e12))


def test_cli_all_methods(folders, tmp_path, capsys):
  config = tmp_path / "cfg.py"
  config.write_text(
      "from jft.config import default_config, parse_arg\n"
      "def methods():\n"
      "  return {'full': ('full', {}, ''), 'lora': ('lora', {'rank': 4}, ''), 'qlora': ('lora', {'rank': 4}, 'nf4')}\n"
      "def get_config(arg=None):\n"
      "  arg = parse_arg(arg, method='lora')\n"
      "  name, hparams, fmt = methods()[arg.method]\n"
      "  c = default_config()\n"
      f"  c.model.name = {folders['B']!r}\n"
      "  c.method.name, c.method.hparams, c.quant.format = name, hparams, fmt\n"
      "  c.data.path = '.'\n"
      "  return c\n")
  assert main(["estimate", "--config", f"{config}:method=full", "--all-methods", "--hardware", "tpu-v5e"]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
  assert [r.split("|")[1].strip() for r in rows[1:]] == ["method", "full", "lora", "qlora"][1:]


@pytest.mark.parametrize("argv,message", [
    (["--hardware", "tpu"], "unknown hardware 'tpu'"),
    (["--config.train.bogus=1"], "unknown config field 'train.bogus'"),
    (["--all-methods"], "defines no methods() table"),
])
def test_cli_errors_exit_2_with_one_line(folders, capsys, argv, message):
  rc = main(["estimate", "--config", "configs/tiny.py", f"--config.model.name={folders['B']}", *argv])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("jft estimate: error:")


def test_memory_warning_when_over_the_hardware(folders):
  c = make_config(folders["B"], "B", "full")
  c.train.batch_size = 4096  # ~40 GiB of saved activations: more than a TPU v5e's 16 GiB
  e = estimate.analytic(c, "tpu-v5e")
  assert e.fits is False and "more than the 16.00 GiB of one tpu-v5e" in estimate.memory_warning(e)


@pytest.mark.parametrize("argv,message", [
    (["--price-per-hour", "-5"], "--price-per-hour -5.0: expected a positive price in USD per chip-hour"),
    (["--price-per-hour", "0"], "--price-per-hour 0.0: expected a positive price"),
    (["--utilization", "0"], "--utilization 0.0: expected a fraction in (0, 1]"),
    (["--utilization", "1.5"], "--utilization 1.5: expected a fraction in (0, 1]"),
    # What `jft train` refuses (schema.validate_against_model): shape B's context is 512 positions.
    (["--config.data.max_length=1000000"], "data.max_length=1000000 = 1000000 positions exceeds the context of "
                                           "model"),
    (["--config.data.max_length=510"], "data.max_length=510 + 20 virtual tokens (prompt) = 530 positions exceeds"),
])
def test_cli_refuses_what_train_refuses_and_bad_settings(folders, capsys, argv, message):
  method = "prompt" if "virtual tokens" in message else "lora"
  rc = main(["estimate", "--config", f"configs/tiny.py:method={method}", f"--config.model.name={folders['B']}", *argv])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("jft estimate: error:"), err


def test_settings_are_checked_before_the_config_is_read(capsys):
  rc = main(["estimate", "--config", "configs/no_such_file.py", "--price-per-hour", "-5"])
  assert rc == 2 and "--price-per-hour -5.0" in capsys.readouterr().err
  with pytest.raises(estimate.EstimateError, match="--price-per-hour -1"):
    estimate.check_settings(0.4, -1)
  estimate.check_settings(1.0, None)  # None: the hardware's typical price (cpu's is 0)


def test_analytic_checks_the_context_like_train(folders):
  c = make_config(folders["F"], "F", "lora")
  c.data.max_length = 65  # shape F's context is 64 positions
  with pytest.raises(estimate.JftError, match="data.max_length=65 = 65 positions exceeds the context"):
    estimate.analytic(c)


def test_a_reward_model_is_estimated_with_its_score_head(folders):
  """The estimate builds the run's method as training does (`objectives.method_of`): a reward objective's
  score head is part of what trains, and of the count."""
  from jft import objectives

  c = make_config(folders["F"], "F", "lora")
  lora_only = estimate.shapes(c)
  c.objective.name, c.objective.hparams = "reward", objectives.default_hparams("reward")
  with_head = estimate.shapes(c)
  head = {p: v for p, v in rules.flatten(with_head.trainable).items() if p not in rules.flatten(lora_only.trainable)}
  assert list(head) == ["score/kernel"], list(head)
  assert head["score/kernel"].shape == (json.load(open(folders["F"] + "/config.json"))["hidden_size"], 1)
