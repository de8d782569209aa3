"""Layer 7: studies over runs (imports run/ and below, never cli/).

    space.py     the search-space language a config file's `sweep()` uses (grid, choice, loguniform...)
    sweep.py     a sweep: one run folder per point, resumable, grid / random / Optuna search
    report.py    tables and plots from run and sweep folders (`jft report`)
    ablate.py    checkpoint-restore ablations: switch parts of a trained adapter off (`jft ablate`)
    estimate.py  the analytical cost model: memory, FLOPs, time and price from a config (`jft estimate`)
    export.py    a run's adapter out: PEFT folder, merged model, trainable leaves (`jft export`)
    pairs.py     on-policy preference pairs sampled from a run and ranked by a reward (`jft pairs`)
"""
