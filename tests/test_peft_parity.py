"""jft's methods against the `peft` library: same weights -> same logits, and files both ways."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import padded_batch
from method_contract import compare, peft_logits, perturb
from safetensors.numpy import load_file

import jft
from jft.core import errors
from jft import peft
from jft.peft.peft_format import PeftFormatError, export_peft, import_peft

CASES = {
    "lora": (peft.LoRA(rank=4, alpha=8), "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora": (peft.LoRA(rank=4, alpha=8, rslora=True, targets=("q_proj", "v_proj", "o_proj", "down_proj")),
               "LoraConfig", dict(r=4, lora_alpha=8, use_rslora=True,
                                  target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])),
    "dora": (peft.DoRA(rank=4, alpha=8), "LoraConfig", dict(r=4, lora_alpha=8, use_dora=True,
                                                             target_modules=["q_proj", "v_proj"])),
    "ia3": (peft.IA3(), "IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"],
                                          feedforward_modules=["down_proj"])),
    "prompt": (peft.PromptTuning(num_virtual_tokens=5), "PromptTuningConfig", dict(num_virtual_tokens=5)),
    "prefix": (peft.Prefix(num_virtual_tokens=5), "PrefixTuningConfig", dict(num_virtual_tokens=5)),
}
VIRTUAL = ("prompt", "prefix")


def batch(name):
  ids, mask = padded_batch(101)
  if name in VIRTUAL:  # no left padding: peft counts positions over padding for virtual tokens
    ids, mask = ids[[0, 2]], mask[[0, 2]]
  return ids, mask


@pytest.mark.parametrize("name", sorted(CASES))
def test_jft_adapter_loads_in_peft(name, hf_models, tmp_path):
  import peft as hf_peft
  import transformers

  folder, _ = hf_models("llama")
  method, _, _ = CASES[name]
  model, params = jft.load_pretrained(folder)
  adapted = perturb(method, method.init(jax.random.PRNGKey(0), params), scale=0.3)
  out = export_peft(method, adapted, model.config, str(tmp_path / "adapter"), base_model=folder)
  written = load_file(os.path.join(out, "adapter_model.safetensors"))
  if name in ("lora", "dora"):
    assert written["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert written["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 4)

  hf_base = transformers.AutoModelForCausalLM.from_pretrained(folder)
  peft_model = hf_peft.PeftModel.from_pretrained(hf_base, out).eval()
  ids, mask = batch(name)
  ours = np.asarray(model.apply({"params": adapted}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  base = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert compare(ours, base, mask) > 1e-2  # the adapter really changes the output
  assert compare(ours, peft_logits(peft_model, ids, mask, name in VIRTUAL), mask) <= 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_adapter_imports_into_jft(name, hf_models, tmp_path):
  import peft as hf_peft
  import torch
  import transformers

  folder, _ = hf_models("llama")
  _, config_cls, kwargs = CASES[name]
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(folder)
  torch.manual_seed(4)  # peft's own random init of the adapter, before the perturbation below
  peft_model = hf_peft.get_peft_model(hf_base, getattr(hf_peft, config_cls)(task_type="CAUSAL_LM", **kwargs))
  torch.manual_seed(5)
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if p.requires_grad:
        p.add_(0.3 * torch.randn_like(p))
  peft_model.eval()
  peft_model.save_pretrained(str(tmp_path / "from_peft"))

  model, params = jft.load_pretrained(folder)
  method, adapted = import_peft(str(tmp_path / "from_peft"), params, model.config)
  assert method.hparams()["method"] == CASES[name][0].name
  ids, mask = batch(name)
  ours = np.asarray(method.configure(model).apply({"params": adapted}, jnp.asarray(ids),
                                                  attention_mask=jnp.asarray(mask)))
  assert compare(ours, peft_logits(peft_model, ids, mask, name in VIRTUAL), mask) <= 1e-4


def test_prefix_with_projection_exports_its_output(hf_models, tmp_path):
  """peft saves a reparameterised prefix as the encoder's output; so does jft."""
  import peft as hf_peft
  import transformers

  folder, _ = hf_models("llama")
  method = peft.Prefix(num_virtual_tokens=5, projection=True, encoder_hidden=16)
  model, params = jft.load_pretrained(folder)
  adapted = method.init(jax.random.PRNGKey(0), params)
  out = export_peft(method, adapted, model.config, str(tmp_path / "prefix"))
  peft_model = hf_peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), out)
  ids, mask = batch("prefix")
  ours = np.asarray(model.apply({"params": method.materialize(adapted)}, jnp.asarray(ids),
                                attention_mask=jnp.asarray(mask)))
  assert compare(ours, peft_logits(peft_model.eval(), ids, mask, True), mask) <= 1e-4


def test_import_errors(hf_models, tmp_path):
  folder, _ = hf_models("llama")
  model, params = jft.load_pretrained(folder)
  with pytest.raises(errors.CheckpointNotFoundError, match="adapter_config.json"):
    import_peft(str(tmp_path), params, model.config)
  method = peft.LoRA(rank=4)
  out = export_peft(method, method.init(jax.random.PRNGKey(0), params), model.config, str(tmp_path / "a"))
  cfg = json.loads(open(os.path.join(out, "adapter_config.json")).read())
  cfg["target_modules"] = ["q_proj", "v_proj", "k_proj"]
  open(os.path.join(out, "adapter_config.json"), "w").write(json.dumps(cfg))
  with pytest.raises(errors.MissingTensorError, match=r"k_proj\.lora_A"):
    import_peft(out, params, model.config)
  with pytest.raises(PeftFormatError, match="no peft equivalent"):
    export_peft(peft.Bottleneck(), peft.Bottleneck().init(jax.random.PRNGKey(0), params), model.config,
                str(tmp_path / "b"))
