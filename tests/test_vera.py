"""VeRA (jft/peft/vera.py) against the method contract and the `peft` library."""

import jax
import numpy as np
import pytest
from method_contract import (check_merge, check_peft_both_ways, check_registered, check_trains_only_its_leaves,
                             tiny_llama)

from jft import peft
from jft.core import rules
from jft.peft.vera import VeRA

L, D, KV, R = 2, 32, 16, 4
METHOD = VeRA(rank=R, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def base(hf_models):
  return tiny_llama(hf_models)


def test_contract(base):
  check_trains_only_its_leaves(METHOD, base, {
      "vera/A": (48, R), "vera/B": (R, D),  # one shared pair: the largest in (down_proj: 48) and out features
      **{f"layers/{m}/vera/lambda_d": (L, R) for m in ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj")},
      "layers/self_attn/q_proj/vera/lambda_b": (L, D), "layers/self_attn/v_proj/vera/lambda_b": (L, KV),
      "layers/mlp/down_proj/vera/lambda_b": (L, D)})
  check_merge(METHOD, base)
  check_registered(METHOD)


def test_the_pair_is_stored_once_and_counted_as_peft_does(base):
  _, params, _, _ = base
  adapted = METHOD.init(jax.random.PRNGKey(0), params)
  trainable, frozen = peft.split(METHOD, adapted)
  assert set(rules.flatten(trainable)) == {p for p in rules.flatten(adapted) if "lambda" in p}
  c = peft.count(METHOD, adapted)  # peft counts lambda_b + lambda_d only (vera_A/B are buffers)
  assert c.trainable == L * (3 * R + D + KV + D)
  assert c.total == sum(x.size for x in jax.tree.leaves(params)) + c.trainable
  # inside the loss each module sees its slices of the one pair
  seen = METHOD.materialize(adapted)["layers"]["self_attn"]["v_proj"]["vera"]
  np.testing.assert_array_equal(seen["B"][1], adapted["vera"]["B"][:, :KV])
  assert "vera" not in METHOD.materialize(adapted)


def test_peft_both_ways(hf_models, tmp_path):
  check_peft_both_ways(METHOD, "VeraConfig", dict(r=R, target_modules=["q_proj", "v_proj", "down_proj"]),
                       hf_models, tmp_path)


def test_a_folder_without_the_pair_is_refused(hf_models, tmp_path):
  import json
  import os

  from jft.peft.peft_format import PeftFormatError, export_peft, import_peft
  import jft

  model, params = jft.load_pretrained(hf_models("llama")[0])
  out = export_peft(METHOD, METHOD.init(jax.random.PRNGKey(0), params), model.config, str(tmp_path / "v"))
  cfg = json.load(open(os.path.join(out, "adapter_config.json")))
  json.dump({**cfg, "save_projection": False}, open(os.path.join(out, "adapter_config.json"), "w"))
  with pytest.raises(PeftFormatError, match="save_projection=False"):
    import_peft(out, params, model.config)
