"""Training on device meshes equals training on one device, with every array where the rules say.

The cases run in a subprocess with 8 simulated CPU devices (`mesh_cases.py`;
XLA_FLAGS must be set before JAX starts, and this pytest process has one
device). The default suite runs QLoRA on a (2,2,2) data x FSDP x tensor mesh,
full fine-tuning on DP vs FSDP, and LoRA and prompt tuning (a virtual-token
method) on (1,2,4); `slow` runs every method on every mesh.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("full", "lora", "qlora", "dora", "bottleneck", "prompt")
MESHES = ("8x1x1", "1x8x1", "2x2x2", "1x2x4")
DEFAULT = ("qlora@2x2x2", "full@8x1x1", "full@1x8x1", "lora@1x2x4", "prompt@1x2x4")


def run_cases(tmp_path, cases):
  out = str(tmp_path / "cases.json")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, os.path.join(HERE, "mesh_cases.py"), out, *cases], env=env,
                     capture_output=True, text=True, timeout=1800)
  assert p.returncode == 0, p.stderr[-4000:]
  with open(out) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def default_cases(tmp_path_factory):
  return run_cases(tmp_path_factory.mktemp("mesh"), DEFAULT)


def check_case(results, case):
  method = case.split("@")[0]
  reference, got = results[f"{method}@1"]["losses"], results[case]["losses"]
  for a, b in zip(reference, got):
    assert abs(a - b) <= 1e-5 * abs(a), (case, reference, got)
  # Every leaf of params and optimizer state, after 5 steps, is sharded as the rules say.
  for group in ("trainable", "frozen", "opt_state"):
    actual, expected = results[case]["actual"][group], results[case]["expected"][group]
    assert actual == expected, (case, group, {k: (actual.get(k), v) for k, v in expected.items()
                                              if actual.get(k) != v})


@pytest.mark.parametrize("case", DEFAULT)
def test_default_meshes_match_one_device(default_cases, case):
  check_case(default_cases, case)


def test_qlora_specs_follow_the_kernel(default_cases):
  """Logical axes -> mesh axes, by hand: LoRA A takes the kernel's input axis, B its output axis;
  packed 4-bit codes and block scales are stored (out, in) and split the same way."""
  tp = default_cases["qlora@2x2x2"]
  t, f, o = (tp["actual"][g] for g in ("trainable", "frozen", "opt_state"))
  assert t["layers/self_attn/q_proj/lora/a"] == "P(None, 'fsdp', None)"
  assert t["layers/self_attn/q_proj/lora/b"] == "P(None, None, 'tensor')"
  assert t["layers/mlp/down_proj/lora/a"] == "P(None, 'tensor', None)"
  assert t["layers/mlp/down_proj/lora/b"] == "P(None, None, 'fsdp')"
  assert f["layers/self_attn/q_proj/kernel/codes"] == "P(None, 'tensor', 'fsdp')"
  assert f["layers/self_attn/q_proj/kernel/absmax_codes"] == "P(None, 'tensor', 'fsdp')"
  assert f["layers/mlp/down_proj/kernel/codes"] == "P(None, 'fsdp', 'tensor')"
  assert f["layers/self_attn/q_proj/kernel/absmax_scale"] == "P(None, None)"
  assert f["embed_tokens/embedding"] == "P('tensor', 'fsdp')"
  assert f["layers/input_layernorm/scale"] == "P(None, None)"
  moments = {k: v for k, v in o.items() if k.endswith("layers/self_attn/q_proj/lora/a")}
  assert len(moments) == 2 and set(moments.values()) == {"P(None, 'fsdp', None)"}, moments


def test_fsdp_cuts_per_device_state(default_cases):
  """Full fine-tuning: params + optimizer state per device, DP (8,1,1) vs ZeRO-3 (1,8,1): the README's 7.9x
  (the batch and the unsplit norms keep it under 8)."""
  dp = default_cases["full@8x1x1"]["memory"]["arguments"]
  fsdp = default_cases["full@1x8x1"]["memory"]["arguments"]
  assert round(dp / fsdp, 1) == 7.9, (dp, fsdp, dp / fsdp)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)  # one subprocess per method, so the workers share the cases
def test_every_method_on_every_mesh(tmp_path, method):
  cases = [f"{method}@{mesh}" for mesh in MESHES]
  results = run_cases(tmp_path, cases)
  for case in cases:
    check_case(results, case)
