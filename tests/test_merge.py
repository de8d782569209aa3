"""`jft merge` against peft 0.22's `LoraModel.add_weighted_adapter`.

Two LoRA adapters (random non-zero A and B, one of them rsLoRA) over a tiny checkpoint are merged by
peft and by `jft merge`; the merged delta weights (B @ A * scale, per target) of jft's OUT/peft/,
loaded back through peft, equal peft's own to 1e-5 for the deterministic types. DARE is random: its
drop rate and rescaling are checked as statistics against peft's functions. The output is a run
folder: eval, export, generate and serve take it. Every bad input is one named error, nothing written.
"""

import json
import os

import numpy as np
import pytest

from jft import cli, run
from jft import config as cfg
from jft.core import rules
from jft.peft import merge as pmerge
from jft.run.train import train
from jft.serve import engine
from jft.studies import merge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
TARGETS = ["q_proj", "v_proj"]


def _peft_adapter(base_folder: str, folder: str, seed: int, rank: int = 4, alpha: float = 8.0, rslora=False,
                  targets=TARGETS, kind="lora", dora=False):
  """A peft adapter folder over `base_folder` with random non-zero factors."""
  import peft
  import torch
  import transformers

  base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
  if kind == "ia3":
    config = peft.IA3Config(target_modules=targets, feedforward_modules=[])
  else:
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                             use_dora=dora)
  model = peft.get_peft_model(base, config)
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name or "ia3_" in name:
        p.copy_(0.3 * torch.randn_like(p))
  model.save_pretrained(folder)
  return folder


def _deltas(model, name: str) -> dict:
  from peft.tuners.lora import LoraLayer

  return {key: module.get_delta_weight(name).detach().numpy() for key, module in model.named_modules()
          if isinstance(module, LoraLayer) and name in module.lora_A}


def _peft_merged(base_folder, folders, weights, kind, density=None, svd_rank=None) -> dict:
  import peft
  import transformers

  base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
  model = peft.PeftModel.from_pretrained(base, folders[0], adapter_name="a0")
  for i, folder in enumerate(folders[1:], 1):
    model.load_adapter(folder, adapter_name=f"a{i}")
  model.add_weighted_adapter([f"a{i}" for i in range(len(folders))], weights, "merged", combination_type=kind,
                             density=density, svd_rank=svd_rank)
  return _deltas(model, "merged")


def _loaded(base_folder, folder) -> dict:
  """The delta weights of a peft folder, loaded by peft."""
  import peft
  import transformers

  base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
  return _deltas(peft.PeftModel.from_pretrained(base, folder, adapter_name="m"), "m")


@pytest.fixture(scope="module")
def adapters(byte_model, tmp_path_factory):
  root = tmp_path_factory.mktemp("merge_inputs")
  return {name: _peft_adapter(byte_model, str(root / name), seed, **kw) for name, seed, kw in (
      ("a", 1, {}), ("b", 2, {"rslora": True, "alpha": 6.0}), ("r2", 3, {"rank": 2, "alpha": 3.0}))}


CASES = [  # (type, inputs, weights, density, svd_rank)
    ("linear", ("a", "b"), [0.7, -0.4], None, None),
    ("cat", ("a", "r2"), [0.6, 0.3], None, None),
    ("svd", ("a", "r2"), [0.6, -0.3], None, None),
    ("svd", ("a", "b"), [0.5, 0.5], None, 3),
    ("ties", ("a", "b"), [0.6, 0.5], 0.5, None),
    ("magnitude_prune", ("a", "b"), [0.6, -0.5], 0.3, None),
]


@pytest.mark.parametrize("kind,names,weights,density,svd_rank", CASES,
                         ids=[f"{c[0]}{'-rank' + str(c[4]) if c[4] else ''}" for c in CASES])
def test_deterministic_types_equal_peft(kind, names, weights, density, svd_rank, adapters, byte_model, tmp_path,
                                        capsys):
  folders = [adapters[n] for n in names]
  want = _peft_merged(byte_model, folders, weights, kind, density, svd_rank)
  out = str(tmp_path / "merged")
  argv = ["merge", *folders, "--method", kind, "--weights", ",".join(map(str, weights)), "--out", out]
  argv += ["--density", str(density)] if density is not None else []
  argv += ["--svd-rank", str(svd_rank)] if svd_rank is not None else []
  assert cli.main(argv) == 0, capsys.readouterr().err
  got = _loaded(byte_model, os.path.join(out, merge.PEFT_FOLDER))
  assert sorted(got) == sorted(want) and len(want) == 4  # q and v of 2 layers
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)
    assert np.abs(want[key]).max() > 0.05  # a real delta, not zeros on both sides
  record = json.load(open(os.path.join(out, merge.RECORD)))
  peft_cfg = json.load(open(os.path.join(out, merge.PEFT_FOLDER, "adapter_config.json")))
  assert peft_cfg["r"] == peft_cfg["lora_alpha"] == record["rank"] == {"cat": 6, "svd": svd_rank or 4}.get(kind, 4)
  # the run folder restores the same adapter: its leaves are what OUT/peft holds
  r = run.restore(out)
  assert r.config.method.hparams.rank == record["rank"] and r.method.scale == 1.0


def _dare_factors(kind, density, n=2, shape=(1, 256, 64), seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_drops_and_rescales_as_peft(kind):
  """Per factor, DARE keeps each entry with probability `density` and divides it by `density`: the same
  statistics as peft's `dare_linear` / `dare_ties` on the same factors, seeded and reproducible."""
  import torch
  from peft.utils import merge_utils

  density, (x, y) = 0.3, _dare_factors(kind, 0.3)
  zeros = np.zeros_like(x)
  weights = [0.8, 0.5]
  scale = np.ones(1, np.float32)
  root = [np.sqrt(w) for w in weights]

  def jft_factor(first, second, seed):
    rngs = tuple([np.random.default_rng([seed, f, i]) for i in range(2)] for f in (0, 1))
    a, _ = pmerge.merge_module(kind, [(first, np.swapaxes(first, -1, -2), scale),
                                      (second, np.swapaxes(second, -1, -2), scale)], weights, 64, density, rngs)
    return a

  def peft_factor(first, second, seed):
    torch.manual_seed(seed)
    fn = getattr(merge_utils, kind)
    return fn([torch.tensor(first[0]), torch.tensor(second[0])], torch.tensor(root), density).numpy()[None]

  if kind == "dare_linear":  # the second adapter zero: what is left is adapter 0's drop and rescale, exactly
    for got in (jft_factor(x, zeros, 0), peft_factor(x, zeros, 0)):
      kept = got != 0
      assert abs(kept.mean() - density) < 0.02
      np.testing.assert_allclose(got[kept], (root[0] * x / density)[kept], rtol=1e-5)
  mine, theirs = jft_factor(x, y, 0), peft_factor(x, y, 0)
  for stat in (lambda t: (t != 0).mean(), lambda t: np.abs(t).mean(), lambda t: np.abs(t).max() > 0):
    assert stat(mine) == pytest.approx(stat(theirs), rel=0.05)
  np.testing.assert_array_equal(jft_factor(x, y, 0), mine)  # seeded
  assert not np.array_equal(jft_factor(x, y, 1), mine)


def test_dare_merge_writes_a_seeded_adapter_peft_loads(adapters, byte_model, tmp_path, capsys):
  outs = []
  for name, seed in (("s0", 0), ("s0again", 0), ("s1", 1)):
    out = str(tmp_path / name)
    assert cli.main(["merge", adapters["a"], adapters["b"], "--method", "dare_ties", "--weights", "0.5,0.5",
                     "--density", "0.5", "--seed", str(seed), "--out", out]) == 0, capsys.readouterr().err
    outs.append(_loaded(byte_model, os.path.join(out, merge.PEFT_FOLDER)))
  key = sorted(outs[0])[0]
  np.testing.assert_array_equal(outs[0][key], outs[1][key])
  assert not np.array_equal(outs[0][key], outs[2][key])


def _tiny_config(byte_model, seed=0, *extra):
  return cfg.build(TINY, [("model.name", byte_model), ("seed", str(seed)), *extra])


@pytest.fixture(scope="module")
def runs(byte_model, tmp_path_factory):
  """Two run folders of `configs/tiny.py` (LoRA rank 4 on q and v) holding random non-zero adapters."""
  import jax

  root = tmp_path_factory.mktemp("merge_runs")
  config = _tiny_config(byte_model)
  _, base, method, _ = run.build_model(config)
  tree = rules.flatten(method.init(jax.random.PRNGKey(0), base))
  folders = []
  for seed in (0, 1):
    rng = np.random.default_rng(seed)
    adapter = {m: tuple(0.3 * rng.normal(size=tree[f"{m}/lora/{k}"].shape).astype(np.float32) for k in "ab")
               for m in method.modules(tree)}
    folders.append(str(root / f"run{seed}"))
    merge.write_run(folders[-1], _tiny_config(byte_model, seed), adapter)
  return folders


def test_merged_runs_are_a_run_folder_eval_export_generate_and_serve_take(runs, byte_model, tmp_path, capsys):
  out = str(tmp_path / "ties")
  assert cli.main(["merge", *runs, "--method", "ties", "--weights", "0.5,0.5", "--density", "0.5",
                   "--out", out]) == 0, capsys.readouterr().err
  config = json.load(open(os.path.join(out, "config.json")))
  first = json.load(open(os.path.join(runs[0], "config.json")))
  assert config["method"]["hparams"] == {**first["method"]["hparams"], "rank": 4, "alpha": 4.0, "rslora": False}
  assert {k: v for k, v in config.items() if k != "method"} == {k: v for k, v in first.items() if k != "method"}
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", out, "--split", "train", "--limit", "4"]) == 0
  assert json.loads(capsys.readouterr().out)["examples"] == 4
  for fmt in ("merged", "peft"):
    assert cli.main(["export", "--workdir", out, "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
  assert cli.main(["generate", "--workdir", out, "--prompt", "hi", "--max-new-tokens", "2"]) == 0
  _, _, _, _, served = engine.restore_adapters(out, None, [("first", runs[0])], report=lambda *_: None)
  assert [a.name for a in served] == ["ties", "first"]
  # replacing: an earlier merge with --overwrite, never another run
  assert cli.main(["merge", *runs, "--method", "linear", "--weights", "1,1", "--out", out, "--overwrite"]) == 0
  assert json.load(open(os.path.join(out, merge.RECORD)))["method"] == "linear"
  capsys.readouterr()
  assert cli.main(["merge", runs[0], "--method", "linear", "--weights", "1", "--out", runs[1], "--overwrite"]) == 2
  assert "refusing to write over the run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_trained_runs_merge_as_their_peft_exports_do(byte_model, tmp_path, capsys):
  """Runs as `jft train` leaves them (best/ and checkpoints/, data positions): merged from the run folders,
  from their peft exports and from one of each, the same adapter as peft's merge of the exports."""
  folders, exports = [], []
  for seed in (0, 1):
    folders.append(str(tmp_path / f"run{seed}"))
    train(_tiny_config(byte_model, seed, ("train.steps", "2"), ("data.max_train_examples", "8"),
                       ("data.eval_split", ""), ("data.test_split", ""), ("eval.zero_shot", "false")),
          folders[-1], echo=lambda *_: None)
    exports.append(str(tmp_path / f"peft{seed}"))
    assert cli.main(["export", "--workdir", folders[-1], "--format", "peft", "--out", exports[-1]]) == 0
  outs = []
  for inputs in (folders, exports, [folders[0], exports[1]]):
    outs.append(str(tmp_path / f"merged{len(outs)}"))
    assert cli.main(["merge", *inputs, "--method", "svd", "--weights", "0.7,0.3", "--svd-rank", "2",
                     "--out", outs[-1]]) == 0, capsys.readouterr().err
  want = _peft_merged(byte_model, exports, [0.7, 0.3], "svd", svd_rank=2)
  for out in outs:
    got = _loaded(byte_model, os.path.join(out, merge.PEFT_FOLDER))
    for key in want:
      np.testing.assert_allclose(got[key], want[key], atol=1e-6)


@pytest.fixture(scope="module")
def bad_inputs(byte_model, hf_models, tmp_path_factory):
  root = tmp_path_factory.mktemp("merge_bad")
  other_base, _ = hf_models("llama")
  return {"other_base": _peft_adapter(other_base, str(root / "other_base"), 4),
          "ia3": _peft_adapter(byte_model, str(root / "ia3"), 5, kind="ia3"),
          "dora": _peft_adapter(byte_model, str(root / "dora"), 6, dora=True),
          "q_only": _peft_adapter(byte_model, str(root / "q_only"), 7, targets=["q_proj"])}


ERRORS = [  # (inputs, extra arguments, the error's words)
    (("a", "other_base"), [], "adapters merge only over one base"),
    (("a", "ia3"), [], "peft_type 'IA3' is not LORA; merge combines plain LoRA adapters"),
    (("a", "dora"), [], "is DoRA"),
    (("a", "q_only"), [], "target different modules"),
    (("a", "r2"), [], "merge method linear needs adapters of one rank, these have ranks [2, 4]"),
    (("a", "b"), ["--weights", "0.5"], "1 weight(s) for 2 adapter(s)"),
    (("a", "b"), ["--weights", "0.5,x"], "expected numbers separated by commas"),
    (("a", "b"), ["--method", "ties", "--density", "0"], "density 0.0: must be in (0, 1]"),
    (("a", "b"), ["--method", "dare_linear", "--density", "1.5"], "density 1.5: must be in (0, 1]"),
    (("a", "b"), ["--method", "ties"], "needs a density"),
    (("a", "b"), ["--density", "0.5"], "density applies to ties, dare_linear, dare_ties, magnitude_prune"),
    (("a", "b"), ["--svd-rank", "2"], "svd_rank applies to the svd method"),
    (("a", "b"), ["--method", "bogus"], "merge method 'bogus' is unknown; choose one of linear, cat, svd"),
    (("a", "b"), ["--method", "svd", "--svd-rank", "40"], "svd rank 40 > min("),
    (("a", "nowhere"), [], "neither a jft run folder"),
    (("a", "b"), ["--out", "EXISTING"], "exists; pass --overwrite"),
    (("a", "b"), ["--config.method.hparams.rank=2"], "--config.method.hparams.rank: set by the merge"),
    (("a", "b"), ["--config.data.nope=1"], "unknown config field 'data.nope'"),
]


@pytest.mark.parametrize("names,extra,words", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_bad_inputs_are_one_named_error_and_nothing_is_written(names, extra, words, adapters, bad_inputs, tmp_path,
                                                               capsys):
  folders = {**adapters, **bad_inputs, "nowhere": str(tmp_path / "nowhere")}
  os.makedirs(folders["nowhere"])
  out = str(tmp_path / "out")
  if "EXISTING" in extra:
    os.makedirs(out)
    extra = [out if e == "EXISTING" else e for e in extra]
  argv = ["merge", *(folders[n] for n in names), "--out", out]
  argv += [] if "--method" in extra else ["--method", "linear"]
  argv += [] if "--weights" in extra else ["--weights", ",".join(["0.5"] * len(names))]
  before = sorted(os.listdir(tmp_path))
  assert cli.main(argv + extra) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("jft merge: error: ") and words in err, err
  assert sorted(os.listdir(tmp_path)) == before


def test_one_peft_adapter_merges_linearly_as_peft_does_into_a_run_given_its_data(adapters, byte_model, tmp_path,
                                                                                  capsys):
  out = str(tmp_path / "one")
  want = _peft_merged(byte_model, [adapters["a"]], [0.5], "svd", svd_rank=2)
  assert cli.main(["merge", adapters["a"], "--method", "svd", "--svd-rank", "2", "--weights", "0.5",
                   "--out", out, f"--config.data.path={os.path.join(ROOT, 'data', 'sentiment')}"]) == 0
  assert "merged as linear" in capsys.readouterr().err
  got = _loaded(byte_model, os.path.join(out, merge.PEFT_FOLDER))
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-5)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model"]["name"] == byte_model and config["objective"]["name"] == "lm"
  assert cli.main(["eval", "--workdir", out, "--split", "test", "--limit", "2"]) == 0
  assert json.loads(capsys.readouterr().out)["examples"] == 2
