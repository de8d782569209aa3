"""Making and running one training run (layer 6: imports config/, objectives/ and below).

    assemble.py    the one assembler: config -> model, base, method, tokenizer, optimizer, state;
                   a run folder -> the same with its trained leaves (`restore`)
    folder.py      the run folder's files: config.json, versions.json, base.json; `best_manager`
    checkpoint.py  orbax checkpoints, sealed with checksums; corrupt steps moved aside
    optim.py       the optax chain from `config.optim` (schedule, clipping, accumulation, decay rules)
    state.py       trainable / frozen / optimizer state, placed by the sharding rules
    step.py        the jitted train step: an objective's loss, differentiated w.r.t. the trainable leaves
    memory.py      what a compiled step takes in device memory (XLA's own analysis)
    plot.py        a run's curves from its metrics.jsonl
    scorer.py      a trained run as a reward function (`run:DIR`)
    train.py       the loop: data -> steps -> evaluation -> checkpoints -> summary

A config field reaches optax in three stops: `jft.config` (file + overrides,
checked by the schema) -> `assemble.make_tx` -> `optim.make_optimizer`.
The names of the former `jft.run` module are re-exported here.
"""

from jft.run.assemble import (Restored, build_model, build_state, make_tx, merged_base, restore,
                              restore_params)
from jft.run import scorer  # noqa: F401  (registers `run:DIR` rewards)
from jft.run.folder import (RunError, base_identity, best_manager, check_base, read_config, versions,
                            write_json)
