"""The config schema: every field has a rule, bad values fail early naming the field and what is allowed,
shipped configs validate, and config files that break are reported as file:line."""

import dataclasses
import glob
import os
import re

import ml_collections
import pytest

from jft import cli, config as cfg, objectives, peft
from jft.run import optim
from jft.config import schema
from jft.studies import sweep
from jft.models.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTIMENT = os.path.join(ROOT, "configs", "sentiment.py") + ":mode=local"
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _spec(name: str) -> str:
  path, _, arg = name.partition(":")
  return os.path.join(ROOT, "configs", path) + (":" + arg if arg else "")


# ---------------------------------------------------------------------------- every field has a rule


def test_every_field_of_the_default_config_has_a_rule():
  c = cfg.default_config()
  leaves = set(cfg.flat_keys(c))
  hparams = {p for p in leaves if p.startswith(tuple(h + "." for h in schema.HPARAMS))}
  assert sorted(leaves - hparams - set(schema.SCHEMA)) == []  # a new field needs a rule
  assert sorted(set(schema.SCHEMA) - leaves) == []  # a removed field takes its rule with it
  for path in hparams:  # the default method's and objective's hyperparameters (all of them: tests below)
    section, _, key = path.split(".", 2)
    table = method_rules(c.method.name) if section == "method" else objectives.OBJECTIVES[c.objective.name].hparam_rules
    assert key in table, path


def method_rules(name: str) -> dict:
  """The rules a method's hyperparameters are checked by: the shared names, then its class's own."""
  return {**peft.HPARAM_RULES, **peft.METHODS[name].hparam_rules}


def test_every_method_hyperparameter_has_a_rule():
  for name, cls in peft.METHODS.items():
    fields = {f.name for f in dataclasses.fields(cls)}
    assert sorted(fields - set(method_rules(name))) == [], name
    assert sorted(set(cls.hparam_rules) - fields) == [], name  # a class declares rules for its own fields only
  every = {f.name for cls in peft.METHODS.values() for f in dataclasses.fields(cls)}
  assert sorted(set(peft.HPARAM_RULES) - every) == []  # no shared rule outlives its fields


def test_every_objective_hyperparameter_has_a_rule_beside_it():
  for name, cls in objectives.OBJECTIVES.items():
    assert sorted(cls.hparam_rules) == sorted(objectives.default_hparams(name)), name


def test_a_new_objective_is_one_class_with_its_rules():
  """Defining an objective registers it, and its rules check configs and Python construction alike; a field
  without a rule is named (so a new objective cannot skip validation)."""
  import dataclasses as dc
  from typing import ClassVar

  from jft.core.fields import Float

  @dc.dataclass(frozen=True)
  class Margin(objectives.Objective):
    name: ClassVar[str] = "test_margin"
    hparam_rules: ClassVar[dict] = {"gap": Float(0, lo_open=True)}
    gap: float = 1.0

  @dc.dataclass(frozen=True)
  class NoRule(objectives.Objective):
    name: ClassVar[str] = "test_no_rule"
    width: int = 3

  try:
    c = cfg.default_config()
    c.objective.name, c.objective.hparams = "test_margin", ml_collections.ConfigDict({"gap": -1.0})
    assert schema.problems(c) == ["objective.hparams.gap=-1.0: expected a finite float > 0"]
    with pytest.raises(objectives.ObjectiveError, match="gap=-1.0: expected a finite float > 0"):
      objectives.build("test_margin", gap=-1.0)
    with pytest.raises(objectives.ObjectiveError, match=r"width: no rule in .*NoRule.hparam_rules"):
      objectives.build("test_no_rule")
  finally:
    objectives.OBJECTIVES.pop("test_margin", None)
    objectives.OBJECTIVES.pop("test_no_rule", None)


def test_every_default_satisfies_its_rule():
  assert schema.problems(cfg.default_config()) == []
  for name, cls in peft.METHODS.items():
    for f in dataclasses.fields(cls):
      if f.default is not dataclasses.MISSING:
        assert method_rules(name)[f.name].problem(f.default) is None, (cls.name, f.name)
  for name, cls in objectives.OBJECTIVES.items():
    for key, value in objectives.default_hparams(name).items():
      assert cls.hparam_rules[key].problem(value) is None, (name, key)


def test_copied_choices_are_what_the_code_accepts():
  """Choices written in the schema (no table to refer to in the consuming code) match the consumer."""
  c = cfg.default_config().optim
  for name in schema.SCHEMA["optim.schedule"].allowed():
    optim.schedule(ml_collections.ConfigDict({**c.to_dict(), "schedule": name}), 10)
  with pytest.raises(optim.OptimError):
    optim.schedule(ml_collections.ConfigDict({**c.to_dict(), "schedule": "step"}), 10)
  for name in schema.SCHEMA["optim.name"].allowed():
    optim.make_optimizer(ml_collections.ConfigDict({**c.to_dict(), "name": name}), 10, {"w": 1.0})
  with pytest.raises(optim.OptimError):
    optim.make_optimizer(ml_collections.ConfigDict({**c.to_dict(), "name": "lion"}), 10, {"w": 1.0})
  for key, method in (("init_a", "lora"), ("init_from", "prompt"), ("encoder", "ptuning")):
    for value in method_rules(method)[key].allowed():
      extra = {"init_token_ids": (1, 2)} if value == "text" else {}
      peft.build(method, **{key: value, **extra})
    with pytest.raises(peft.MethodError):
      peft.build(method, **{key: "other"})


# ---------------------------------------------------------------------------- shipped configs validate


SHIPPED = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("name", SHIPPED + ["dpo.py:objective=kto", "dpo.py:objective=orpo", "grpo.py:stage=sft",
                                            "instruct.py:template=chat", "sentiment.py:method=qlora",
                                            "sentiment.py:method=prompt", "tiny.py:objective=grpo",
                                            "tiny.py:objective=reward", "tiny.py:method=compose"])
def test_shipped_configs_validate(name):
  config = cfg.load_config(_spec(name))
  assert schema.problems(config) == []


# ---------------------------------------------------------------------------- bad values, named


def _set(path, value):
  def edit(c):
    node = c
    *parents, leaf = path.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return edit


# (base spec, overrides, edit of the config file's result or None, regex the message must match)
BAD = [
    ("sentiment", [("model.dtype", "float16")], None, r"model\.dtype='float16': expected one of float32, bfloat16"),
    ("sentiment", [("eval.zero_shot_split", "evl")], None,
     r"eval\.zero_shot_split='evl': expected one of eval, test \(zero-shot .*\(did you mean eval"),
    ("sentiment", [("train.save_every", "0")], None, r"train\.save_every=0: expected an int >= 1"),
    ("sentiment", [("train.batch_size", "0")], None, r"train\.batch_size=0: expected an int >= 1"),
    ("sentiment", [("train.steps", "-3")], None, r"train\.steps=-3: expected an int >= 1"),
    ("sentiment", [("train.nan_policy", "skp")], None,
     r"train\.nan_policy='skp': expected one of stop, skip \(on a non-finite .*\(did you mean skip"),
    ("sentiment", [("optim.lr", "-1e-3")], None, r"optim\.lr=-0\.001: expected a finite float > 0"),
    ("sentiment", [("optim.lr", "nan")], None, r"optim\.lr=nan: expected a finite float > 0"),
    ("sentiment", [("optim.schedule", "cosin")], None, r"optim\.schedule='cosin': .*did you mean cosine"),
    ("sentiment", [("optim.name", "adam")], None, r"optim\.name='adam': expected one of adamw, sgd, adafactor"),
    ("sentiment", [("optim.b2", "1.0")], None, r"optim\.b2=1\.0: expected a finite float in \[0, 1\)"),
    ("sentiment", [("optim.grad_accum", "0")], None, r"optim\.grad_accum=0: expected an int >= 1"),
    ("sentiment", [("optim.decay_rules", "(('(bias', False),)")], None,
     r"optim\.decay_rules=.*'\(bias' is not a valid regex"),
    ("sentiment", [("model.remat", "ful")], None, r"model\.remat='ful': expected one of none, full.*did you mean full"),
    ("sentiment", [("quant.format", "nf5")], None, r"quant\.format='nf5': expected one of '', nf4, fp4, int4, int8"),
    ("sentiment", [("quant.blocksize", "0")], None, r"quant\.blocksize=0: expected an int >= 1"),
    ("sentiment", [("data.truncation", "middle")], None, r"data\.truncation='middle': expected one of left, right"),
    ("sentiment", [("data.holdout", "1.0")], None, r"data\.holdout=1\.0: expected a finite float in \[0, 1\)"),
    ("sentiment", [("data.max_length", "0")], None, r"data\.max_length=0: expected an int >= 2"),
    ("sentiment", [("data.template", "Review: {txt}")], None, r"data\.template='Review: \{txt\}': .*\{text\}"),
    ("sentiment", [("train.mesh.data", "0")], None, r"train\.mesh\.data=0: expected an int >= 1 or -1"),
    ("sentiment", [("train.mesh.data", "-1"), ("train.mesh.fsdp", "-1")], None,
     r"train\.mesh=.*at most one axis may be -1"),
    ("sentiment", [("train.axis_rules", "(('embed', 'fsdpp'),)")], None,
     r"train\.axis_rules=.*'fsdpp' is not a mesh axis \(data, fsdp, tensor\)"),
    ("sentiment", [("method.name", "lroa")], None, r"method\.name='lroa': expected one of .*did you mean lora"),
    ("sentiment", [("objective.name", "clasification")], None,
     r"objective\.name='clasification': .*did you mean classification"),
    ("sentiment", [("method.hparams.rank", "0")], None, r"method\.hparams\.rank=0: expected an int >= 1"),
    ("sentiment", [("method.hparams.dropout", "1.5")], None,
     r"method\.hparams\.dropout=1\.5: expected a finite float in \[0, 1\)"),
    ("sentiment", [("method.hparams.init_a", "kaimin")], None,
     r"method\.hparams\.init_a='kaimin': .*did you mean kaiming"),
    ("sentiment", [], _set("method.hparams.rnak", 4),
     r"method\.hparams\.rnak: method lora has no hyperparameter 'rnak'.*did you mean rank"),
    ("sentiment", [], _set("train.save_evry", 5),
     r"train\.save_evry: not a config field \(did you mean train\.save_every"),
    ("sentiment", [], _set("train", ml_collections.ConfigDict({"steps": 5})), r"train\.batch_size: missing"),
    ("tiny:method=compose", [], _set("method.hparams", {"methods": ({"method": "lora", "rank": 0},)}),
     r"method\.hparams\.methods=.*part 0: rank=0: expected an int >= 1"),
    ("tiny:method=compose", [], _set("method.hparams", {"methods": ({"method": "lorra"},)}),
     r"part 0: method='lorra': expected one of .*did you mean lora"),
    ("dpo", [("objective.hparams.loss_type", "sigmod")], None,
     r"objective\.hparams\.loss_type='sigmod': expected one of .*did you mean sigmoid"),
    ("dpo", [("objective.hparams.beta", "0")], None, r"objective\.hparams\.beta=0\.0: expected a finite float > 0"),
    ("dpo", [("data.pack", "true")], None, r"data\.pack=True: objective dpo keeps its rows apart"),
    ("dpo", [], _set("objective.hparams.bta", 0.1), r"objective\.hparams\.bta: objective dpo has no hyperparameter.*"
                                                    r"did you mean beta"),
    ("grpo", [("objective.hparams.group_size", "3")], None,
     r"train\.batch_size=16 completions is not a multiple of group_size=3"),
    ("grpo", [("objective.hparams.group_size", "1")], None, r"objective\.hparams\.group_size=1: expected an int >= 2"),
    ("grpo", [("objective.hparams.max_new_tokens", "64")], None,
     r"objective\.hparams\.max_new_tokens=64: expected < data\.max_length=64"),
]


def _load(base: str):
  name, _, arg = base.partition(":")
  return _spec(f"{name}.py" + (f":{arg}" if arg else "")), [("model.name", "/m")] if name == "tiny" else []


@pytest.mark.parametrize("base, overrides, edit, message", BAD,
                         ids=[f"{i}-{b.split(':')[0]}-{o[-1][0] if o else 'edit'}" for i, (b, o, *_) in enumerate(BAD)])
def test_bad_values_name_the_field_and_what_is_allowed(base, overrides, edit, message):
  spec, required = _load(base)
  if edit is None:
    with pytest.raises(cfg.ConfigError, match=message):
      cfg.build(spec, required + overrides)
    return
  config = cfg.build(spec, required + overrides)
  with config.unlocked():
    edit(config)
  with pytest.raises(cfg.ConfigError, match=message):
    schema.validate(config)


def test_all_problems_are_reported_at_once():
  with pytest.raises(cfg.ConfigError, match=r"\(3 problems\)") as e:
    cfg.build(SENTIMENT, [("train.steps", "0"), ("optim.lr", "0"), ("eval.batch_size", "0")])
  assert all(f"{field}=0" in str(e.value) for field in ("train.steps", "optim.lr", "eval.batch_size"))


def test_cli_and_sweep_points_are_validated(tmp_path, capsys):
  code = cli.main(["train", "--config", SENTIMENT, "--config.train.save_every=0", "--workdir", str(tmp_path / "r")])
  err = capsys.readouterr().err
  assert code == 2 and "train.save_every=0: expected an int >= 1" in err and len(err.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "r")
  with pytest.raises(sweep.SweepError, match=r"sweep point .*optim\.lr=0\.0: expected a finite float > 0"):
    sweep.point_config(TINY, [("model.name", "/m")], {"optim.lr": 0.0})


# ---------------------------------------------------------------------------- against the model


def _model(context: int) -> ModelConfig:
  return ModelConfig(family="llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=2, head_dim=4, max_position_embeddings=context)


def test_max_length_against_the_models_context():
  c = cfg.build(TINY, [("model.name", "/m"), ("data.max_length", "64")])
  schema.validate_against_model(c, _model(64))  # fits exactly
  c = cfg.build(TINY, [("model.name", "/m"), ("data.max_length", "65")])
  with pytest.raises(cfg.ConfigError, match=r"data\.max_length=65 = 65 positions exceeds the context of model /m "
                                            r"\(64 positions.*at most 64"):
    schema.validate_against_model(c, _model(64))


@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning", "compose"])
def test_virtual_tokens_count_against_the_context(method):
  c = cfg.build(f"{TINY}:method={method}", [("model.name", "/m"), ("data.max_length", "48")])
  with c.unlocked():
    c.method.hparams = ({"methods": ({"method": "lora"}, {"method": "prompt", "num_virtual_tokens": 20})}
                        if method == "compose" else {"num_virtual_tokens": 20})
  schema.validate(c)
  schema.validate_against_model(c, _model(68))
  with pytest.raises(cfg.ConfigError, match=r"data\.max_length=48 \+ 20 virtual tokens .* = 68 positions .*"
                                            r"at most 44"):
    schema.validate_against_model(c, _model(64))


# ---------------------------------------------------------------------------- broken config files: file:line


def _file(tmp_path, body: str) -> str:
  path = tmp_path / "exp.py"
  path.write_text("from jft.config import default_config, parse_arg\n" + body)
  return str(path)


@pytest.mark.parametrize("body, line, message", [
    ("def get_config(arg=None):\n  c = default_config(\n  return c\n", r"3", r"SyntaxError"),
    ("def get_config(arg=None):\n  c = default_config()\n   c.seed = 1\n", r"4", r"IndentationError"),
    ("import no_such_module_for_jft\n", r"2", r"ModuleNotFoundError: No module named 'no_such_module_for_jft'"),
    ("def get_config(arg=None):\n  c = default_config()\n  c.seed = undefined_name\n  return c\n", r"4",
     r"NameError: name 'undefined_name' is not defined"),
    ("def get_config(arg=None):\n  arg = parse_arg(arg, mode='full')\n  raise ValueError(f'mode={arg.mode!r}')\n",
     r"4", r"mode='full'$"),
    ("from jft import objectives\ndef get_config(arg=None):\n  c = default_config()\n"
     "  c.objective.hparams = objectives.default_hparams('dpoo')\n  return c\n", r"5",
     r"unknown objective 'dpoo'.*did you mean dpo"),
    ("def get_config(arg=None):\n  c = default_config()\n  c.train.steps = 'ten'\n  return c\n", r"4",
     r"TypeError: Could not override field 'steps'"),
    ("def get_config(arg=None):\n  return {'seed': 0}\n", None, r"get_config returned a dict, not a ConfigDict"),
])
def test_broken_config_files_are_reported_with_file_and_line(tmp_path, body, line, message):
  path = _file(tmp_path, body)
  where = re.escape(path) + (f":{line}" if line else "")
  with pytest.raises(cfg.ConfigError, match=f"^{where}: .*{message}" if line else f"^{where}: {message}"):
    cfg.load_config(path)


def test_cli_reports_a_broken_config_file_in_one_line(tmp_path, capsys):
  path = _file(tmp_path, "def get_config(arg=None):\n  return 1 / 0\n")
  assert cli.main(["train", "--config", path, "--workdir", str(tmp_path / "r")]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"jft train: error: {path}:3: ZeroDivisionError: division by zero"


def test_the_cli_offers_the_compute_dtypes_the_models_run_in():
  """`jft generate --dtype` lists its choices without importing the models (a fast --help): the same names."""
  from jft import cli
  from jft.models import COMPUTE_DTYPES

  parser = cli.build_parser()
  generate = parser._subparsers._group_actions[0].choices["generate"]
  dtype = next(a for a in generate._actions if a.dest == "dtype")
  assert tuple(dtype.choices) == COMPUTE_DTYPES
