"""LoHa (jft/peft/loha.py) against the method contract and the `peft` library."""

import jax
import pytest
from method_contract import (check_merge, check_peft_both_ways, check_registered, check_trains_only_its_leaves,
                             tiny_llama)

from jft import peft
from jft.peft.loha import LoHa

L, D, KV, FFN, R = 2, 32, 16, 48, 4
METHOD = LoHa(rank=R, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def base(hf_models):
  return tiny_llama(hf_models)


@pytest.mark.slow  # the whole contract (about a minute); peft parity below stays in the default suite
def test_contract(base):
  shapes = {}
  for module, d_in, d_out in (("self_attn/q_proj", D, D), ("self_attn/v_proj", D, KV), ("mlp/down_proj", FFN, D)):
    shapes.update({f"layers/{module}/loha/{k}": s for k, s in (
        ("w1_in", (L, d_in, R)), ("w1_out", (L, R, d_out)), ("w2_in", (L, d_in, R)), ("w2_out", (L, R, d_out)),
        ("scale", (L,)))})
  check_trains_only_its_leaves(METHOD, base, shapes)
  check_merge(METHOD, base)
  check_registered(METHOD)
  _, params, _, _ = base
  c = peft.count(METHOD, METHOD.init(jax.random.PRNGKey(0), params))  # as peft: 2 * r * (in + out) per module
  assert c.trainable == L * 2 * R * ((D + D) + (D + KV) + (FFN + D))


def test_peft_both_ways(hf_models, tmp_path):
  check_peft_both_ways(METHOD, "LoHaConfig", dict(r=R, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                       hf_models, tmp_path)
