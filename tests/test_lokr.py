"""LoKr (jft/peft/lokr.py) against the method contract and the `peft` library."""

import jax
import pytest
from method_contract import (check_merge, check_peft_both_ways, check_registered, check_trains_only_its_leaves,
                             tiny_llama)

from jft import peft
from jft.peft.lokr import LoKr, factorization

L, D, KV, FFN = 2, 32, 16, 48


@pytest.fixture(scope="module")
def base(hf_models):
  return tiny_llama(hf_models)


def test_factorization_as_peft():
  from peft.tuners.lokr.layer import factorization as reference

  for n in (1, 7, 12, 16, 32, 48, 576, 1536, 4096, 14336):
    for factor in (-1, 2, 4, 8, 16, 32):
      assert factorization(n, factor) == reference(n, factor), (n, factor)


@pytest.mark.slow  # model-scale / long: make test-slow (the default suite stays under 15 min)
def test_contract_full_factors(base):
  """r = 4 >= half the second factors: W2 is one full matrix (as peft decides)."""
  method = LoKr(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
  # q: in 32 = 4 x 8, out 32 = 4 x 8; v: out 16 = 4 x 4; down: in 48 = 6 x 8
  check_trains_only_its_leaves(method, base, {
      "layers/self_attn/q_proj/lokr/w1": (L, 4, 4), "layers/self_attn/q_proj/lokr/w2": (L, 8, 8),
      "layers/self_attn/v_proj/lokr/w1": (L, 4, 4), "layers/self_attn/v_proj/lokr/w2": (L, 8, 4),
      "layers/mlp/down_proj/lokr/w1": (L, 6, 4), "layers/mlp/down_proj/lokr/w2": (L, 8, 8),
      **{f"layers/{m}/lokr/scale": (L,) for m in ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj")}})
  check_merge(method, base)
  check_registered(method)


@pytest.mark.slow  # its merge and gradients run by default (test below); the full contract is the full-factor one
def test_contract_low_rank_factors(base):
  """r = 2 < half the second factors, decompose_both: both factors low rank."""
  method = LoKr(rank=2, alpha=4.0, targets=("q_proj",), decompose_both=True, decompose_factor=4)
  # in 32 -> (4, 8), out 32 -> (4, 8); r=2 < max(4, 4)/2 is false -> W1 full; r=2 < 8/2 -> W2 low rank
  check_trains_only_its_leaves(method, base, {
      "layers/self_attn/q_proj/lokr/w1": (L, 4, 4), "layers/self_attn/q_proj/lokr/w2_in": (L, 8, 2),
      "layers/self_attn/q_proj/lokr/w2_out": (L, 2, 8), "layers/self_attn/q_proj/lokr/scale": (L,)})
  check_merge(method, base)
  method = LoKr(rank=1, alpha=4.0, targets=("q_proj",), decompose_both=True, decompose_factor=4)
  _, params, _, _ = base
  assert {"w1_in", "w1_out", "w2_in", "w2_out", "scale"} == set(
      method.init(jax.random.PRNGKey(0), params)["layers"]["self_attn"]["q_proj"]["lokr"])
  check_merge(method, base)


@pytest.mark.parametrize("kwargs", [dict(r=4, alpha=8),  # the low-rank variant's merge/grads run by default
                                    pytest.param(dict(r=1, alpha=2, decompose_both=True), marks=pytest.mark.slow)],
                         ids=["full_factors", "low_rank_both"])
def test_peft_both_ways(kwargs, hf_models, tmp_path):
  method = LoKr(rank=kwargs["r"], alpha=kwargs["alpha"], targets=("q_proj", "v_proj", "down_proj"),
                decompose_both=kwargs.get("decompose_both", False))
  check_peft_both_ways(method, "LoKrConfig", dict(kwargs, target_modules=["q_proj", "v_proj", "down_proj"]),
                       hf_models, tmp_path)
