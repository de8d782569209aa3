"""jft in EleutherAI's lm-evaluation-harness (`jft.harness`), against the harness's own Hugging Face model.

On the same task files and weights, `model="jft"` and `model="hf"` (transformers, float32) give the same
per-document log-likelihoods (to 1e-4), the same `is_greedy` flags, the same generations and the same
metrics, for the three request types (a multiple-choice task, a rolling log-likelihood task whose long
document spans several windows, a generate_until task with a stop sequence), on a tiny base model and on
a LoRA run (unmerged and merged; hf with `peft=` the folder `jft export --format peft` writes). The local
tasks read jft's data offline with the quickstart's prompt; bad inputs are one named error each.
"""

import json
import os
import subprocess
import sys

import lm_eval
import lm_eval.tasks
import lm_eval.utils
import numpy as np
import pytest
from lm_eval.api.registry import get_model

from jft import cli
from jft import config as cfg
from jft.models import generate as gen
from jft.run.train import train
from jft.studies import export, harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
TASKS = ["t_mc", "t_roll", "t_gen"]
MAX_LENGTH = 64  # the byte model's context is 256: 64 puts the long document over three rolling windows

DOCS = [{"text": "x" * 150, "label": 0, "answer": "ok"}] + [
    {"text": f"review {i}: {'a good film' if i % 2 else 'a dull film'}", "label": i % 2, "answer": "ok"}
    for i in range(1, 6)]

YAMLS = {
    "t_mc": 'output_type: multiple_choice\ndoc_to_text: "{{text}}\\nSentiment:"\n'
            'doc_to_choice: ["negative", "positive"]\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n',
    "t_roll": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: text\n'
              'metric_list:\n  - metric: word_perplexity\n',
    "t_gen": 'output_type: generate_until\ndoc_to_text: "{{text}}:"\ndoc_to_target: answer\n'
             'generation_kwargs:\n  until: ["e"]\n  max_gen_toks: 12\n  do_sample: false\n'
             'metric_list:\n  - metric: exact_match\n',
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
  """A folder of three tiny task YAMLs over one local JSONL file."""
  folder = tmp_path_factory.mktemp("harness_tasks")
  with open(folder / "docs.jsonl", "w") as f:
    f.writelines(json.dumps(d) + "\n" for d in DOCS)
  data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\ntest_split: test\n"
  for name, body in YAMLS.items():
    (folder / f"{name}.yaml").write_text(f"task: {name}\n{data}{body}")
  return str(folder)


def _run(model: str, model_args: str, tasks: str, names=TASKS):
  """-> (results, {task: per-document responses}) of simple_evaluate on the folder's tasks."""
  manager = lm_eval.tasks.TaskManager(include_path=tasks, include_defaults=False)
  out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(names), task_manager=manager,
                                log_samples=True)
  samples = {t: [s["resps"] for s in sorted(rows, key=lambda s: s["doc_id"])] for t, rows in out["samples"].items()}
  return out["results"], samples


def _hf_args(base: str, extra: str = "") -> str:
  return f"pretrained={base},dtype=float32,device=cpu,batch_size=4,max_length={MAX_LENGTH}{extra}"


def _assert_same(got, want):
  """Same metrics, and per document the same log-likelihoods (1e-4), greedy flags and generations."""
  (results, samples), (want_results, want_samples) = got, want
  assert set(samples) == set(want_samples)
  for task in samples:
    assert len(samples[task]) == len(want_samples[task]) == len(DOCS), task
    for doc, (a, b) in enumerate(zip(samples[task], want_samples[task])):
      for x, y in zip(a, b):
        x, y = x[0], y[0]
        if isinstance(x, str):
          assert x == y, (task, doc)
        elif isinstance(x, tuple):
          assert abs(x[0] - y[0]) <= 1e-4 and x[1] == y[1], (task, doc, x, y)
        else:
          assert abs(x - y) <= 1e-4, (task, doc, x, y)
  assert results["t_mc"]["acc,none"] == want_results["t_mc"]["acc,none"]
  np.testing.assert_allclose(results["t_roll"]["word_perplexity,none"], want_results["t_roll"]["word_perplexity,none"],
                             rtol=1e-4)
  if "t_gen" in results:
    assert results["t_gen"]["exact_match,none"] == want_results["t_gen"]["exact_match,none"]


@pytest.fixture(scope="module")
def hf_base(byte_model, tasks):
  return _run("hf", _hf_args(byte_model), tasks)


def test_jft_matches_the_harness_hf_model_on_every_request_type(byte_model, tasks, hf_base):
  got = _run("jft", f"model={byte_model},batch_size=4,max_length={MAX_LENGTH}", tasks)
  _assert_same(got, hf_base)
  # the long document (one token per byte) is scored over three of the harness's windows
  windows = lm_eval.utils.get_rolling_token_windows(list(range(len(DOCS[0]["text"]))), 0, MAX_LENGTH, 1)
  assert len(list(windows)) == 3


def test_is_greedy_agrees_with_the_hf_model_on_a_greedy_continuation(byte_model):
  from lm_eval.models.huggingface import HFLM

  ours = get_model("jft")(model=byte_model, batch_size=2, max_length=MAX_LENGTH)
  theirs = HFLM(pretrained=byte_model, dtype="float32", device="cpu", batch_size=2, max_length=MAX_LENGTH)
  context = ours.tok_encode("a review:")
  greedy = gen.generate(ours.model, ours.params, [context], gen.Sampling(max_new_tokens=5))[0]
  other = greedy[:-1] + [(greedy[-1] + 1) % 250]
  requests = [(None, context, greedy), (None, context, other)]
  got, want = ours._loglikelihood_tokens(requests), theirs._loglikelihood_tokens(requests)
  assert [g for _, g in got] == [g for _, g in want] == [True, False]
  np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in want], atol=1e-4)


@pytest.fixture(scope="module")
def lora_run(byte_model, tmp_path_factory):
  """A two-step LoRA run on the byte model and its peft export."""
  root = tmp_path_factory.mktemp("harness_lora")
  workdir, peft_dir = str(root / "run"), str(root / "peft")
  config = cfg.build(f"{TINY}:method=lora", [("model.name", byte_model), ("train.steps", "2"),
                                             ("data.max_train_examples", "8"), ("data.eval_split", ""),
                                             ("data.test_split", ""), ("eval.zero_shot", "false")])
  train(config, workdir, echo=lambda *_: None)
  export.export(workdir, peft_dir, "peft")
  return workdir, peft_dir


def test_a_lora_run_matches_hf_with_its_peft_export_unmerged_and_merged(byte_model, tasks, lora_run, hf_base):
  """The log-likelihood request types (generation runs the same decoder as the base model's test)."""
  workdir, peft_dir = lora_run
  names = ["t_mc", "t_roll"]
  want = _run("hf", _hf_args(byte_model, f",peft={peft_dir}"), tasks, names)
  unmerged = _run("jft", f"workdir={workdir},batch_size=4,max_length={MAX_LENGTH}", tasks, names)
  _assert_same(unmerged, want)
  merged = _run("jft", f"workdir={workdir},merge=true,batch_size=4,max_length={MAX_LENGTH}", tasks, names)
  _assert_same(merged, want)
  # the adapter changed what is scored: a run that lost its leaves could not pass for it
  moved = [abs(a[0][0] - b[0][0]) for a, b in zip(unmerged[1]["t_roll"], hf_base[1]["t_roll"])]
  assert max(moved) > 1e-3


def test_jft_eval_harness_writes_the_results_into_the_run_folder(lora_run, tasks, capsys):
  """Local tasks (offline, from jft's data) beside a task of --include-path, on a run folder."""
  workdir, _ = lora_run
  assert cli.main(["eval", "--workdir", workdir, "--harness", "jft_sentiment,jft_chat,t_mc", "--include-path", tasks,
                   "--limit", "2"]) == 0
  path = os.path.join(workdir, "harness", "results.json")
  assert f"harness results: {path}" in capsys.readouterr().out
  results = json.load(open(path))["results"]
  assert {t: results[t]["sample_len"] for t in results} == {"jft_sentiment": 2, "jft_chat": 2, "t_mc": 2}
  assert 0 <= results["jft_sentiment"]["acc,none"] <= 1 and results["jft_chat"]["exact_match,strip"] == 0.0


def test_the_local_tasks_read_jfts_data_with_the_quickstart_prompt():
  manager = harness.task_manager(None, ["jft_sentiment", "jft_alpaca_heldout", "jft_chat"])
  loaded = manager.load(["jft_sentiment", "jft_alpaca_heldout", "jft_chat"])["tasks"]
  sentiment = cfg.build(os.path.join(ROOT, "configs", "sentiment.py"), [])
  task = loaded["jft_sentiment"]
  docs = list(task.eval_docs)
  assert len(docs) == 1006
  assert task.doc_to_text(docs[0]) == sentiment.data.template.format(text=docs[0]["text"])
  assert task.doc_to_choice(docs[0]) == list(sentiment.data.labels)
  assert [task.doc_to_choice(d)[task.doc_to_target(d)] for d in docs[:20]] == [d["label"] for d in docs[:20]]
  # the Alpaca rows configs/instruct.py evaluates on (its 10% holdout, seed 0)
  from jft import data
  instruct = cfg.build(os.path.join(ROOT, "configs", "instruct.py"), [])
  held = data.load_split(instruct.data.path, "validation", **data.holdout_of(instruct.data))
  alpaca = list(loaded["jft_alpaca_heldout"].eval_docs)
  assert [d["output"] for d in alpaca] == list(held["output"]) and len(alpaca) == 100
  chat = list(loaded["jft_chat"].eval_docs)
  assert len(chat) == 239 and all(isinstance(d["responses"], list) and d["response"] in d["responses"] for d in chat)


def test_bad_inputs_are_one_named_error_each(byte_model, tasks, tmp_path, capsys):
  with pytest.raises(harness.HarnessError, match=r"unknown harness task\(s\) no_such_task; local tasks: .*jft_chat"):
    harness.evaluate("no_such_task", model=byte_model)
  with pytest.raises(harness.HarnessError, match=r"--include-path .*missing: no such folder"):
    harness.evaluate("t_mc", model=byte_model, include_path=str(tmp_path / "missing"))
  manager = lm_eval.tasks.TaskManager(include_path=tasks, include_defaults=False)
  with pytest.raises(harness.HarnessError, match=r"model_args: unknown key\(s\) bogus; allowed: workdir"):
    lm_eval.simple_evaluate(model="jft", model_args=f"model={byte_model},bogus=1", tasks=["t_mc"],
                            task_manager=manager)
  with pytest.raises(harness.HarnessError, match=r"model_args workdir=.*: not a jft run folder"):
    get_model("jft")(workdir=str(tmp_path))
  assert cli.main(["eval", "--workdir", str(tmp_path), "--harness", "t_mc", "--include-path", tasks]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "jft eval: error: --workdir" in err and "not a jft run folder" in err
  assert not os.path.exists(tmp_path / "harness")


def test_python_m_jft_harness_is_lm_evals_command_line():
  assert get_model("jft") is harness.JftLM
  out = subprocess.run([sys.executable, "-m", "jft.harness", "run", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "--model_args" in out.stdout and "--include_path" in out.stdout


@pytest.fixture(scope="module")
def smollm2_folder(smollm2, tmp_path_factory):
  """The embedded SmolLM2-135M as jft loads it (float32), saved as a transformers folder both models read."""
  import jft

  model, params = smollm2
  folder = str(tmp_path_factory.mktemp("smollm2_hf"))
  return jft.save_pretrained(model, params, folder, tokenizer=jft.load_tokenizer("smollm2-135m"))


@pytest.mark.slow
def test_smollm2_sentiment_matches_hf_and_jfts_label_word_accuracy(smollm2_folder):
  """50 test reviews: the same log-likelihoods as hf, the same accuracy, which is jft's own label-word accuracy."""
  from jft.models import load_pretrained, load_tokenizer
  from jft.run.train import evaluate_split, examples_for

  limit = 50
  manager = harness.task_manager(None, ["jft_sentiment"])
  runs = {}
  for name, args in (("jft", f"model={smollm2_folder},batch_size=16"),
                     ("hf", f"pretrained={smollm2_folder},dtype=float32,device=cpu,batch_size=16")):
    out = lm_eval.simple_evaluate(model=name, model_args=args, tasks=["jft_sentiment"], task_manager=manager,
                                  limit=limit, log_samples=True)
    rows = sorted(out["samples"]["jft_sentiment"], key=lambda s: s["doc_id"])
    runs[name] = out["results"]["jft_sentiment"]["acc,none"], [[r[0][0] for r in s["resps"]] for s in rows]
  (acc, lls), (hf_acc, hf_lls) = runs["jft"], runs["hf"]
  np.testing.assert_allclose(lls, hf_lls, atol=1e-4)
  assert acc == hf_acc
  config = cfg.build(os.path.join(ROOT, "configs", "sentiment.py"), [("model.name", smollm2_folder)])
  model, params = load_pretrained(smollm2_folder)
  tokenizer = load_tokenizer(smollm2_folder)
  examples = examples_for(config, tokenizer, "test", limit)
  assert evaluate_split(config, model, params, tokenizer, examples)["accuracy"] == acc
