"""Every command the READMEs show runs: a smoke test per documented workflow on a tiny model, so a change
elsewhere cannot silently break one (as an export guard once broke `experiments/compare_methods.py`).

Covered elsewhere, through the real entry point (not repeated here):
- `jft train` (tests/test_reliability_cli.py, test_experiments.py, test_objectives.py, ...), with `--resume`
  (test_checkpoint_faults.py, test_kill_anywhere.py), `--dry-run` (test_experiments.py), `--init-from`
  (test_objectives.py), `--distributed` / `--coordinator` / `--num-processes` / `--process-id`
  (test_distributed_flags.py, test_multiprocess.py);
- `jft eval --workdir [--limit]` (test_experiments.py); `jft export --format peft|merged|trainable|adapters
  [--overwrite]` (test_experiments.py, test_reliability_cli.py); `jft generate --model M [--quantize nf4]`
  (test_smollm2.py, test_quant.py); `jft sweep` with `--search optuna`, `--trials`, `--point` and resuming
  (test_sweep.py); `jft report` of a sweep and of a run (test_sweep.py); `jft ablate --kind --split --limit
  --out` (test_ablate.py); `jft estimate --hardware --all-methods --json` (test_estimate.py); `jft pairs
  --reward run:DIR` (test_objectives.py); `python -m jft.cli.host_memory python ...` (test_host_memory.py);
- `experiments/compare_methods.py` (test_experiments.py, slow); `benchmarks/race.py --compare` and `--rounds`
  (test_race.py, on made-up results files).

Here: the README's `jft` command lines and the scripts' (`scripts/*.sbatch`, `scripts/*.yaml`) against
`jft.cli.build_parser()` (a subcommand or flag that drifted fails, no model needed); `jft eval --split
--checkpoint` and `jft generate --workdir --checkpoint`, which no other test runs; `jft sweep --search random
--parallel 2` (slow); `experiments/alignment/judge_policies.py`; each `benchmarks/*.py --quick`; and
`scripts/prepare_data.py` / `scripts/fetch_llamafactory_data.py` (`--help`, and a full run into a temporary
folder that must reproduce the committed checksums: PyPI is needed, as `make test` needs it anyway).
"""

import glob
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest

from jft import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
ONE_STEP = ["--config.train.steps=1", "--config.data.max_train_examples=8", "--config.data.max_eval_examples=4",
            "--config.data.test_split=", "--config.eval.zero_shot=false"]


def _read(path):
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    return f.read()


def _python(*args, env=None, timeout=600):
  """Run `python ARGS` from the repository root -> stdout; a failure shows its stderr."""
  p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                     env={**os.environ, **(env or {})})
  assert p.returncode == 0, f"{' '.join(args)}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
  return p.stdout


# ---------------------------------------------------------------------------- the documented `jft` lines


def _subcommands():
  return cli.build_parser()._subparsers._group_actions[0].choices


def _code_blocks(text):
  """The lines of every fenced code block, with `\\` continuations joined."""
  lines = []
  for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
    lines += block.replace("\\\n", " ").splitlines()
  return lines


def _section(text, heading):
  return text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]


def _jft_lines(lines):
  """`jft ...` command lines (also after `srun`) as token lists, comments dropped."""
  out = []
  for line in lines:
    line = line.strip()
    if re.match(r"(srun )?jft [a-z]", line):
      out.append(shlex.split(line, comments=True)[line.startswith("srun "):])
  return out


def _scripts_lines():
  lines = []
  for path in sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sbatch")) +
                     glob.glob(os.path.join(ROOT, "scripts", "*.yaml"))):
    with open(path) as f:
      text = f.read().replace("\\\n", " ")
    # a YAML folded block (`- >-`) is one command over several lines
    text = re.sub(r"\n\s+(--)", r" \1", text)
    lines += [line.lstrip("# ") for line in text.splitlines()]
  return lines


COMMAND_LINE = _jft_lines(_code_blocks(_section(_read("README.md"), "## The command line")))
DOCUMENTED = [("README.md", tokens) for tokens in _jft_lines(_code_blocks(_read("README.md")))] + \
             [("scripts/", tokens) for tokens in _jft_lines(_scripts_lines())]


def _check_flags(tokens):
  """Every `--flag` of one documented command is accepted by its subcommand; `--flag a|b|c` names choices."""
  commands = _subcommands()
  assert tokens[0] == "jft" and tokens[1] in commands, f"`jft {tokens[1]}` is not a subcommand: {' '.join(tokens)}"
  sub = commands[tokens[1]]
  for i, token in enumerate(tokens[2:], 2):
    flag = token.strip("[]").split("=", 1)[0]
    if not flag.startswith("--"):
      continue
    if flag.startswith("--config."):  # a config override: only commands that take them
      assert sub.get_default("accepts_overrides"), f"jft {tokens[1]} takes no {flag}"
      continue
    assert flag in sub._option_string_actions, f"jft {tokens[1]} has no {flag} (documented: {' '.join(tokens)})"
    action = sub._option_string_actions[flag]
    value = tokens[i + 1].strip("[]") if i + 1 < len(tokens) else ""
    if action.choices is not None and "|" in value:
      for choice in value.split("|"):
        assert choice in action.choices, f"jft {tokens[1]} {flag}: {choice!r} is not one of {action.choices}"


def test_the_command_line_section_shows_every_subcommand():
  assert len(COMMAND_LINE) >= 10
  shown = {tokens[1] for tokens in COMMAND_LINE}
  assert shown == set(_subcommands()), f"README's command line misses {set(_subcommands()) - shown}"


@pytest.mark.parametrize("tokens", COMMAND_LINE, ids=lambda t: " ".join(t)[:60])
def test_the_command_line_section_parses(tokens):
  """Each line of README's "## The command line", with `[optional]` flags in and the first of `a|b` values,
  is a command the parser accepts (required arguments present, values of the right type and choice)."""
  _check_flags(tokens)
  argv = [t.strip("[]").split("|")[0] for t in tokens[1:]]
  try:
    args, rest = cli.build_parser().parse_known_args(argv)
  except SystemExit:  # argparse printed why
    pytest.fail(f"README's `{' '.join(tokens)}` does not parse: jft {' '.join(argv)}")
  assert args.command == tokens[1]
  assert not rest or (getattr(args, "accepts_overrides", False) and all(r.startswith("--config.") for r in rest)), rest


@pytest.mark.parametrize("where, tokens", DOCUMENTED, ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else x)
def test_every_documented_jft_command_uses_real_flags(where, tokens):
  """README's other code blocks (studies, alignment stages, multi-process) and the SLURM/Kubernetes scripts."""
  _check_flags(tokens)


def test_the_scripts_commands_are_checked():
  """The SLURM and Kubernetes scripts' `jft train` and `jft sweep` (the multi-line ones too) reach the check above."""
  found = [tokens for where, tokens in DOCUMENTED if where == "scripts/"]
  assert {"train", "sweep"} <= {tokens[1] for tokens in found}
  assert any("--process-id" in tokens for tokens in found) and any("--point" in tokens for tokens in found)


# ---------------------------------------------------------------------------- a tiny run: judge, eval, generate


@pytest.fixture(scope="module")
def classifier_run(byte_model, tmp_path_factory):
  """A one-step classification run on the byte-level model (a `run:` scorer and a policy at once)."""
  workdir = str(tmp_path_factory.mktemp("documented") / "run")
  assert cli.main(["train", "--config", TINY, f"--config.model.name={byte_model}", *ONE_STEP,
                   "--workdir", workdir]) == 0
  return workdir


def test_judge_policies_scores_every_run_with_every_score(classifier_run, tmp_path):
  """`experiments/alignment/judge_policies.py RUN --score run:DIR --score FILE.py:FN --prompts N --out F`
  (experiments/README.md; vader needs a package the test extra lacks, any jft.objectives.reward_functions spec stands in)."""
  (tmp_path / "length.py").write_text("def reward(prompts, completions):\n"
                                      "  return [len(c) / 24 for c in completions]\n")
  scores = [f"run:{classifier_run}", f"{tmp_path / 'length.py'}:reward"]
  out = tmp_path / "judged.json"
  stdout = _python("experiments/alignment/judge_policies.py", classifier_run, "--score", scores[0], "--score",
                   scores[1], "--prompts", "4", "--out", str(out))
  printed = json.loads(stdout.strip().splitlines()[-1])[classifier_run]
  result = json.loads(out.read_text())
  assert result["prompts"] == 4 and set(result["runs"]) == {classifier_run}
  row = result["runs"][classifier_run]
  assert row["step"] == 1 and len(row["samples"]) == 4 and all(s["prompt"] for s in row["samples"])
  for spec, threshold in zip(scores, (0.5, 0.0)):  # a classifier's P(positive) against 0.5, a function's 0
    assert row[spec]["threshold"] == threshold and printed[spec] == row[spec]
    assert math.isfinite(row[spec]["mean"]) and 0 <= row[spec]["positive_fraction"] <= 1
  assert 0 < row[scores[0]]["mean"] < 1


def test_eval_with_a_split_and_a_checkpoint_and_generate_from_a_run(classifier_run, capsys):
  """`jft eval --workdir R --split validation --checkpoint latest` and `jft generate --workdir R --checkpoint
  latest --prompt ...`: the README's forms that no other test runs."""
  assert cli.main(["eval", "--workdir", classifier_run, "--split", "validation", "--checkpoint", "latest",
                   "--limit", "4"]) == 0
  assert "validation" in capsys.readouterr().out
  assert cli.main(["generate", "--workdir", classifier_run, "--checkpoint", "latest", "--prompt", "A fine film",
                   "--prompt", "A dull one", "--max-new-tokens", "4"]) == 0
  out = capsys.readouterr().out
  assert "### A fine film" in out and "### A dull one" in out


@pytest.mark.slow  # two point processes at once, each a one-step run (about a minute on 2 cores)
def test_sweep_random_search_in_parallel(byte_model, tmp_path):
  """`jft sweep --config ... --workdir W --search random --trials 2 --parallel 2` (README's command line)."""
  out = str(tmp_path / "sweep")
  assert cli.main(["sweep", "--config", TINY, f"--config.model.name={byte_model}", *ONE_STEP, "--workdir", out,
                   "--search", "random", "--trials", "2", "--parallel", "2"]) == 0
  points = sorted(os.listdir(os.path.join(out, "points")))
  assert len(points) == 2, points
  table = open(os.path.join(out, "results.md")).read()
  assert table.count("| done |") == 2, table


# ---------------------------------------------------------------------------- benchmarks/*.py --quick


def _committed_results():
  """path -> SHA-256 of every file under benchmarks/ (results*.md, scale_memory.md, ...): --quick writes none."""
  out = {}
  for path in glob.glob(os.path.join(ROOT, "benchmarks", "**", "*"), recursive=True):
    if os.path.isfile(path) and "__pycache__" not in path:
      with open(path, "rb") as f:
        out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


def _table(stdout, header):
  """The rows (as cell lists) of the Markdown table whose header starts with `header`."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  assert lines[start + 1].startswith("|---"), lines[start:start + 2]
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip().strip("|").split("|")])
  return rows


def _quick(script, env=None):
  before = _committed_results()
  stdout = _python(os.path.join("benchmarks", script), "--quick", env=env)
  assert _committed_results() == before, "--quick wrote into benchmarks/"
  return stdout


def test_loss_positions_quick():
  rows = _table(_quick("loss_positions.py"), "| what |")
  assert [r[0] for r in rows] == ["head + loss, every token", "head + loss, SFT, 30-70% prompt",
                                  "head + loss, label word", "DPO step, LoRA all, 2 pairs x 32"]
  assert float(rows[-1][3].replace(",", "")) > 0 and float(rows[-1][4].replace(",", "")) > 0  # temporaries, MiB


@pytest.mark.slow  # three compiles (about 30 s on 2 cores)
def test_step_memory_quick():
  rows = {(r[0], r[1]): r for r in _table(_quick("step_memory.py"), "| method | base |")}
  assert set(rows) == {("full", "fp32"), ("lora all", "fp32"), ("lora all", "nf4+dq")}
  assert rows[("lora all", "fp32")][2] == rows[("lora all", "nf4+dq")][2]  # the same trainable leaves
  assert float(rows[("lora all", "nf4+dq")][3]) < float(rows[("lora all", "fp32")][3])  # a 4-bit base is smaller


@pytest.mark.slow  # two compiles on 8 simulated devices (about 30 s on 2 cores)
def test_scale_memory_quick():
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  rows = _table(_quick("scale_memory.py", env={"XLA_FLAGS": flags.strip()}), "| base | mesh |")
  assert [(r[0], r[1]) for r in rows] == [("LoRA (bf16 base)", "FSDP+TP (1,2,4)"),
                                          ("QLoRA (NF4 + DQ base)", "FSDP (1,8,1)")]
  assert all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)


@pytest.mark.slow  # nine worker processes, jft's and torch's (about a minute on 2 cores)
def test_race_quick():
  """One tiny cell per side (jft and transformers + peft), GEMM rates, compile at two depths, decoding."""
  stdout = _quick("race.py")
  assert "## Notes" not in stdout, stdout  # a worker's error would be a note
  (row,) = _table(stdout, "| model | cell |")
  assert row[:3] == ["tiny", "lora-all", "16,384"], row
  jft_loss, peer_loss = (float(x) for x in row[10].split(" / "))
  assert abs(jft_loss - peer_loss) < 1e-2, row  # the same weights, batch and loss on both sides
  assert len(_table(stdout, "| model | layers |")) == 2
  (decode,) = _table(stdout, "| model | batch |")
  assert decode[:2] == ["tiny", "1"] and float(decode[2]) > 0 and float(decode[3]) > 0, decode


# ---------------------------------------------------------------------------- scripts/


@pytest.mark.parametrize("script", ["prepare_data.py", "fetch_llamafactory_data.py"])
def test_data_scripts_help(script):
  assert "--out" in _python(os.path.join("scripts", script), "--help")


def test_prepare_data_reproduces_the_embedded_data(tmp_path):
  """`python scripts/prepare_data.py --out DIR` (downloads two packages from PyPI, a few seconds): the same
  bytes as the committed data/, by its SHA256SUMS."""
  _python("scripts/prepare_data.py", "--out", str(tmp_path))
  for name in ("sentiment", "chat"):
    assert (tmp_path / name / "SHA256SUMS").read_text() == _read(f"data/{name}/SHA256SUMS"), name


LLAMAFACTORY_SUMS = ("bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318  alpaca_en_demo.json\n"
                     "b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3  dpo_en_demo.json\n")


def test_fetch_llamafactory_data_writes_the_known_files(tmp_path):
  """`python scripts/fetch_llamafactory_data.py --out DIR` (the llamafactory 0.9.5 sdist from PyPI): the two
  demo files with the checksums they had when the tests were written, a SHA256SUMS and the licence note."""
  _python("scripts/fetch_llamafactory_data.py", "--out", str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["LICENSE.md", "SHA256SUMS", "alpaca_en_demo.json", "dpo_en_demo.json"]
  assert (tmp_path / "SHA256SUMS").read_text() == LLAMAFACTORY_SUMS
