"""`jft prune`: the maths of one layer (N:M and per-row masks exact, Wanda's activation-aware choice, SparseGPT's
smaller reconstruction error), the block-by-block pass equal to the model's, the folder transformers loads with
jft's logits, layer dropping, the zeros kept through LoRA training and `jft export --format merged`, and one
named error per bad input with nothing written."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jft
from jft import cli
from jft import config as cfg
from jft.core import rules
from jft.quant import sparsity
from jft.run.train import train
from jft.studies import prune as prune_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
IDS = np.random.RandomState(0).randint(0, 256, (2, 12)).astype(np.int64)  # bytes: never the special tokens


def _rng_layer(seed=0, rows=16, inputs=64, tokens=512):
  """A layer W [out, in] and inputs X [tokens, in] as LLM activations are: features of different scales that
  correlate (a few directions plus noise), so the methods' choices differ and SparseGPT's updates have
  something to compensate with."""
  rng = np.random.RandomState(seed)
  w = rng.randn(rows, inputs).astype(np.float32)
  scale = np.exp(rng.randn(inputs) * 0.7)
  x = (rng.randn(tokens, 16) @ rng.randn(16, inputs) + 0.3 * rng.randn(tokens, inputs)) * scale
  return w, x.astype(np.float32)


def _zeros_per_group(w, m):
  return (np.asarray(w).reshape(w.shape[0], -1, m) == 0).sum(-1)


# ----------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4"])
def test_nm_masks_are_exact(spec):
  pattern = sparsity.parse_pattern(spec)
  w, x = _rng_layer()
  sq, xtx = (x * x).sum(0), x.T @ x
  pruned = {
      "magnitude": prune_mod.prune_layer("magnitude", w, pattern),
      "wanda": prune_mod.prune_layer("wanda", w, pattern, sq_norm=sq),
      "sparsegpt": prune_mod.prune_layer("sparsegpt", w, pattern, xtx=xtx, tokens=len(x)),
  }
  for method, p in pruned.items():
    # N kept of every M consecutive inputs of a row: exactly M - N zeros per group (no weight here is 0 itself)
    assert (_zeros_per_group(p, pattern.m) == pattern.m - pattern.n).all(), method
  mask = sparsity.prune_mask(np.ones((3, 16)), pattern)  # ties: still exactly M - N per group
  assert (mask.reshape(3, -1, pattern.m).sum(-1) == pattern.m - pattern.n).all()


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.75])
def test_unstructured_sparsity_is_the_request_on_every_row(fraction):
  pattern = sparsity.parse_pattern(str(fraction))
  w, x = _rng_layer(1, rows=8, inputs=300)  # 300 columns: SparseGPT's blocks of 128 do not divide it
  want = int(np.floor(fraction * 300 + 0.5))
  for method in prune_mod.METHODS:
    p = prune_mod.prune_layer(method, w, pattern, sq_norm=(x * x).sum(0), xtx=x.T @ x, tokens=len(x))
    assert ((p == 0).sum(1) == want).all(), (method, (p == 0).sum(1))


def test_wanda_follows_activations_where_magnitude_does_not():
  # row [1.0, 0.5, 2.0, 1.5]: magnitude drops the two smallest weights (0.5, 1.0); input 1 carries norm 10, so
  # Wanda's |W| * ||X|| = [0.1, 5, 2, 1.5] drops inputs 0 and 3 instead
  w = np.array([[1.0, 0.5, 2.0, 1.5]], np.float32)
  sq_norm = np.array([0.01, 100.0, 1.0, 1.0])
  pattern = sparsity.parse_pattern("0.5")
  magnitude = prune_mod.prune_layer("magnitude", w, pattern)
  wanda = prune_mod.prune_layer("wanda", w, pattern, sq_norm=sq_norm)
  np.testing.assert_array_equal(magnitude, [[0.0, 0.0, 2.0, 1.5]])
  np.testing.assert_array_equal(wanda, [[0.0, 0.5, 2.0, 0.0]])


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_sparsegpt_reconstructs_the_layer_best(spec):
  pattern = sparsity.parse_pattern(spec)
  w, x = _rng_layer(2)
  error = {}
  for method in prune_mod.METHODS:
    p = prune_mod.prune_layer(method, w, pattern, sq_norm=(x * x).sum(0), xtx=x.T @ x, tokens=len(x))
    error[method] = float(np.linalg.norm(x @ w.T - x @ p.T))
  assert error["sparsegpt"] < error["wanda"] < error["magnitude"], error
  assert error["sparsegpt"] < 0.8 * error["wanda"], error


def test_patterns_parse_and_refuse():
  assert sparsity.parse_pattern("0.5") == sparsity.Pattern(0.5)
  assert sparsity.parse_pattern("2:4") == sparsity.Pattern(0.5, 2, 4)
  assert str(sparsity.parse_pattern("4:8")) == "4:8"
  for bad in ("0", "1", "1.5", "-0.2", "abc", "4:4", "3:2", "0:4", "2.5:4", "a:b", "2:4:8"):
    with pytest.raises(sparsity.SparsityError, match="--sparsity"):
      sparsity.parse_pattern(bad)


# ----------------------------------------------------------------------------
# A model
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
  path = tmp_path_factory.mktemp("calibration") / "rows.jsonl"
  rng = np.random.RandomState(0)
  words = "the film was a quiet delight with sharp writing and a dull middle act".split()
  with open(path, "w") as f:
    for i in range(24):
      row = ({"text": " ".join(rng.choice(words, 10))} if i % 2 else  # bytes: every row under 64 tokens
             {"prompt": " ".join(rng.choice(words, 3)), "response": " ".join(rng.choice(words, 2))})
      f.write(json.dumps(row) + "\n")
  return str(path)


def _cli(capsys, *argv):
  capsys.readouterr()
  code = cli.main(["prune", *argv])
  return code, capsys.readouterr()


def test_block_by_block_pass_is_the_model(byte_model):
  """The calibration states advanced through every block, then the final norm, are the model's hidden states."""
  model, params = jft.load_pretrained(byte_model)
  rows = [np.arange(5, 17, dtype=np.int32), np.arange(40, 47, dtype=np.int32)]
  flat = {p: np.asarray(v) for p, v in rules.flatten(params).items()}
  calib = prune_mod._Calibration(model.config, flat, prune_mod.batches(rows, 8, 0))
  for i in range(model.config.num_layers):
    calib.advance(model.config, prune_mod._layer(flat, i))
  (ids, mask), = prune_mod.batches(rows, 8, 0)
  want = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                return_hidden=True))
  norm = jft.models.layers.RMSNorm(model.config.norm_eps)
  got = np.asarray(norm.apply({"params": params["norm"]}, calib.hidden[0]))
  np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-5)


def test_pruned_folder_loads_in_transformers_with_jfts_logits(byte_model, calibration, tmp_path, capsys):
  import torch
  import transformers

  out = str(tmp_path / "pruned")
  code, io = _cli(capsys, "--model", byte_model, "--data", calibration, "--method", "wanda", "--sparsity", "2:4",
                  "--out", out)
  assert code == 0, io.err
  assert "wanda 2:4 on 14 linear layers (50.0% of their weights zero)" in io.out
  record = json.load(open(os.path.join(out, sparsity.RECORD)))
  assert record["pattern"] == "2:4" and record["method"] == "wanda" and record["calibration"]["rows"] == 24
  weights = load_file(os.path.join(out, "model.safetensors"))
  assert len(record["modules"]) == 14
  for module in record["modules"]:  # the masks are the zeros: 2 of every 4 inputs of each row, as recorded
    w = weights[module["name"]]
    assert (_zeros_per_group(w, 4) >= 2).all() and np.mean(w == 0) == module["sparsity"] == 0.5, module["name"]
  dense = load_file(os.path.join(byte_model, "model.safetensors"))
  np.testing.assert_array_equal(weights["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    want = torch_model(torch.tensor(IDS)).logits.numpy()
  model, params = jft.load_pretrained(out)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, jnp.asarray(IDS))), want, atol=1e-4)
  dense_model, dense_params = jft.load_pretrained(byte_model)
  assert np.abs(np.asarray(dense_model.apply({"params": dense_params}, jnp.asarray(IDS))) - want).max() > 1e-3


def test_sparsegpt_on_targets_only(byte_model, calibration, tmp_path):
  out = str(tmp_path / "pruned")
  record = prune_mod.prune(out, model=byte_model, data_path=calibration, method="sparsegpt", sparsity_spec="0.5",
                           targets=r"layers/1/mlp/", report=lambda line: None)
  assert sorted((m["layer"], m["path"]) for m in record["modules"]) == [
      (1, f"layers/mlp/{p}_proj/kernel") for p in ("down", "gate", "up")]
  weights, dense = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(byte_model,
                                                                                           "model.safetensors"))
  for name, w in weights.items():
    if name.startswith("model.layers.1.mlp."):
      assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
    else:
      np.testing.assert_array_equal(w, dense[name], err_msg=name)  # untouched, bit for bit


def test_magnitude_needs_no_calibration_rows(byte_model, tmp_path):
  record = prune_mod.prune(str(tmp_path / "pruned"), model=byte_model, method="magnitude", sparsity_spec="4:8",
                           targets="layers/0/self_attn/q_proj", report=lambda line: None)
  assert record["calibration"]["rows"] == 0 and [m["name"] for m in record["modules"]] == [
      "model.layers.0.self_attn.q_proj.weight"]
  w = load_file(str(tmp_path / "pruned" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
  assert (_zeros_per_group(w, 8) == 4).all()


def test_drop_layers_removes_the_closest_block(byte_model, calibration, tmp_path, capsys):
  import torch
  import transformers

  out = str(tmp_path / "dropped")
  code, io = _cli(capsys, "--model", byte_model, "--data", calibration, "--drop-layers", "0.5", "--out", out)
  assert code == 0, io.err
  record = json.load(open(os.path.join(out, sparsity.RECORD)))
  hf = json.load(open(os.path.join(out, "config.json")))
  assert hf["num_hidden_layers"] == record["num_hidden_layers"] == 1
  distances = record["angular_distance"]["by_first_layer"]
  (gone,) = record["dropped_layers"]
  assert len(distances) == 2 and gone == int(np.argmin(distances))
  weights, dense = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(byte_model,
                                                                                           "model.safetensors"))
  kept = 1 - gone
  for name, w in weights.items():  # the kept block, renumbered to 0
    np.testing.assert_array_equal(w, dense[name.replace("layers.0.", f"layers.{kept}.")], err_msg=name)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    want = torch_model(torch.tensor(IDS)).logits.numpy()
  model, params = jft.load_pretrained(out)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, jnp.asarray(IDS))), want, atol=1e-4)


@pytest.fixture(scope="module")
def lora_on_pruned(byte_model, calibration, tmp_path_factory):
  """(pruned folder, run folder): Wanda 50% on the byte model, then 2 LoRA steps of configs/tiny.py on it."""
  pruned = str(tmp_path_factory.mktemp("pruned") / "base")
  prune_mod.prune(pruned, model=byte_model, data_path=calibration, method="wanda", sparsity_spec="0.5",
                  report=lambda line: None)
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  config = cfg.build(TINY, [("model.name", pruned), ("train.steps", "2"), ("data.max_train_examples", "8"),
                            ("data.eval_split", ""), ("data.test_split", ""), ("eval.zero_shot", "false")])
  train(config, workdir, echo=lambda *_: None)
  return pruned, workdir


def test_merged_export_keeps_the_pruned_zeros(lora_on_pruned, tmp_path, capsys):
  pruned, workdir = lora_on_pruned
  out = str(tmp_path / "merged")
  capsys.readouterr()
  assert cli.main(["export", "--workdir", workdir, "--format", "merged", "--out", out]) == 0, capsys.readouterr().err
  record = json.load(open(os.path.join(pruned, sparsity.RECORD)))
  merged, base = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(pruned, "model.safetensors"))
  changed = 0
  for module in record["modules"]:
    w, b = merged[module["name"]], base[module["name"]]
    assert (w[b == 0] == 0).all(), module["name"]
    assert np.mean(w == 0) == module["sparsity"] == 0.5, module["name"]
    changed += int((w != b).any())
  assert changed == 4  # LoRA on q_proj and v_proj of both layers moved their kept weights


def test_prune_a_run_on_its_training_rows(lora_on_pruned, tmp_path, capsys):
  """--workdir: the run's model (its adapter merged, zeros kept) pruned further, on the run's own rows."""
  _, workdir = lora_on_pruned
  out = str(tmp_path / "again")
  code, io = _cli(capsys, "--workdir", workdir, "--method", "sparsegpt", "--sparsity", "4:8", "--calibration", "6",
                  "--out", out)
  assert code == 0, io.err
  record = json.load(open(os.path.join(out, sparsity.RECORD)))
  assert record["calibration"]["rows"] == 6 and record["source"] == workdir
  weights = load_file(os.path.join(out, "model.safetensors"))
  for module in record["modules"]:
    assert (_zeros_per_group(weights[module["name"]], 8) >= 4).all(), module["name"]


BAD = {
    "sparsity above 1": (["--sparsity", "1.5"], r"--sparsity 1.5: outside \(0, 1\)"),
    "sparsity 0": (["--sparsity", "0"], r"--sparsity 0: outside \(0, 1\)"),
    "N >= M": (["--sparsity", "4:2"], r"--sparsity 4:2: N=4 must be at least 1 and less than M=2"),
    "N:M not integers": (["--sparsity", "2.5:4"], r"--sparsity '2.5:4': not N:M with integers"),
    "no data file": (["--sparsity", "0.5", "--data", "{tmp}/missing.jsonl"], r"--data .*missing.jsonl: no such file"),
    "no --data": (["--sparsity", "0.5", "--data", None], r"--method wanda needs calibration rows: give --data FILE"),
    "rows without the field": (["--sparsity", "0.5", "--data", "{tmp}/bad.jsonl"],
                               r"bad.jsonl: row 0 has neither a 'text' field nor 'prompt' and 'response' fields; "
                               r"its fields: \['body'\]"),
    "targets match nothing": (["--sparsity", "0.5", "--targets", "lm_head"],
                              r"--targets 'lm_head' matches no linear layer; they are layers/<i>/<module>"),
    "drop-layers 1": (["--drop-layers", "1"], r"--drop-layers 1.0: expected a fraction of the layers in \[0, 1\)"),
    "drop-layers negative": (["--drop-layers", "-0.25"], r"--drop-layers -0.25: expected a fraction"),
    "out exists": (["--sparsity", "0.5", "--out", "{tmp}/full"], r"--out .*full exists and is not empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_one_named_error_and_nothing_written(case, byte_model, calibration, tmp_path, capsys):
  (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "text"}) + "\n")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  flags, message = BAD[case]
  argv = {"--model": byte_model, "--data": calibration, "--out": str(tmp_path / "out")}
  extra = []
  for flag, value in zip(flags[::2], flags[1::2]):
    if flag in argv:
      argv[flag] = value if value is None else value.format(tmp=tmp_path)
    else:
      extra += [flag, value]
  args = [x for flag, value in argv.items() if value is not None for x in (flag, value)] + extra
  before = sorted(os.listdir(tmp_path))
  code, io = _cli(capsys, *args)
  assert code == 2, io.err
  lines = io.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jft prune: error: "), io.err
  assert re.search(message, lines[0]), lines[0]
  assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "full") == ["keep.txt"]
