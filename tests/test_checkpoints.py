"""save_pretrained round trips through transformers, and bad input gets named errors."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import padded_batch, torch_logits
from safetensors.numpy import load_file, save_file

import jft
from jft.core import errors
from jft.models.pretrained import resolve


@pytest.mark.parametrize("family", ["llama3_rope_untied", "qwen2", "mistral_window", "gpt2"])
def test_save_pretrained_round_trip(family, hf_models, tmp_path):
  import transformers

  folder, hf_model = hf_models(family)
  model, params = jft.load_pretrained(folder)
  out = jft.save_pretrained(model, params, str(tmp_path / "saved"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids, mask = padded_batch(model.config.vocab_size)
  real = mask.astype(bool)
  assert np.abs(torch_logits(reloaded, ids, mask) - torch_logits(hf_model, ids, mask))[real].max() <= 1e-5
  # And back into jft: identical params.
  _, again = jft.load_pretrained(out)
  for a, b in zip(np.array(jax_leaves(params), dtype=object), jax_leaves(again)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_save_pretrained_writes_tokenizer(tmp_path, smollm2):
  model, params = smollm2
  tok = jft.load_tokenizer("smollm2-135m")
  out = jft.save_pretrained(model, params, str(tmp_path / "smol"), tokenizer=tok)
  files = set(os.listdir(out))
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
  tok2 = jft.load_tokenizer(out)
  assert tok2("Paris is nice")["input_ids"] == tok("Paris is nice")["input_ids"]
  assert jft.load_pretrained(out)[0].config == model.config


def _copy(folder, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(folder, dst)
  return dst


def _edit_tensors(dst, edit):
  path = str(dst / "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_unknown_architecture(hf_models, tmp_path):
  dst = _copy(hf_models("llama")[0], tmp_path)
  cfg = json.loads((dst / "config.json").read_text())
  cfg["model_type"] = "bert"
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(errors.UnknownArchitectureError, match=r"config\.json.*'bert'"):
    jft.load_pretrained(str(dst))


def test_missing_tensor(hf_models, tmp_path):
  dst = _copy(hf_models("llama")[0], tmp_path)
  _edit_tensors(dst, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(errors.MissingTensorError, match=r"model\.safetensors.*model\.layers\.1\.mlp\.up_proj"):
    jft.load_pretrained(str(dst))


def test_unexpected_tensor(hf_models, tmp_path):
  dst = _copy(hf_models("llama")[0], tmp_path)
  _edit_tensors(dst, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(errors.UnexpectedTensorError, match=r"model\.safetensors.*model\.layers\.0\.extra"):
    jft.load_pretrained(str(dst))


def test_shape_mismatch(hf_models, tmp_path):
  dst = _copy(hf_models("llama")[0], tmp_path)
  _edit_tensors(dst, lambda t: t.update(
      {"model.layers.0.self_attn.q_proj.weight": np.zeros((32, 31), np.float32)}))
  with pytest.raises(errors.ShapeMismatchError,
                     match=r"model\.safetensors.*model\.layers\.0\.self_attn\.q_proj\.weight.*\(31, 32\)"):
    jft.load_pretrained(str(dst))


def test_truncated_safetensors(hf_models, tmp_path):
  dst = _copy(hf_models("llama")[0], tmp_path)
  path = dst / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(errors.CorruptCheckpointError, match="model.safetensors"):
    jft.load_pretrained(str(dst))


def test_sharded_index(hf_models, tmp_path):
  folder, _ = hf_models("llama")
  dst = tmp_path / "sharded"
  dst.mkdir()
  shutil.copy(os.path.join(folder, "config.json"), dst)
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(dst / file), metadata={"format": "pt"})
    weight_map.update({k: file for k in keys})
  (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _, a = jft.load_pretrained(folder)
  _, b = jft.load_pretrained(str(dst))
  for x, y in zip(jax_leaves(a), jax_leaves(b)):
    np.testing.assert_array_equal(x, y)
  os.remove(dst / "model-00002-of-00002.safetensors")
  with pytest.raises(errors.CheckpointNotFoundError, match="model-00002-of-00002"):
    jft.load_pretrained(str(dst))


def test_truncated_gguf(tmp_path):
  path = tmp_path / "broken.gguf"
  with open(resolve("smollm2-135m"), "rb") as f:
    path.write_bytes(f.read(3_000_000))
  with pytest.raises(errors.CorruptCheckpointError, match="broken.gguf"):
    jft.load_pretrained(str(path))


def test_unknown_gguf_architecture(tmp_path):
  import gguf

  path = str(tmp_path / "other.gguf")
  writer = gguf.GGUFWriter(path, "bert")
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(errors.UnknownArchitectureError, match=r"other\.gguf.*'bert'"):
    jft.load_pretrained(path)


def test_missing_checkpoint(hf_models, tmp_path):
  with pytest.raises(errors.CheckpointNotFoundError, match="embedded"):
    jft.load_pretrained("no-such-model")
  with pytest.raises(errors.CheckpointNotFoundError, match="config.json"):
    jft.load_pretrained(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(errors.CheckpointError, match="config.json.*'num_attention_heads' is missing"):
    jft.load_pretrained(str(tmp_path))
  shutil.copy(os.path.join(hf_models("llama")[0], "config.json"), tmp_path)
  with pytest.raises(errors.CheckpointNotFoundError, match="model.safetensors"):
    jft.load_pretrained(str(tmp_path))
