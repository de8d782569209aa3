"""Layer 0: what every other part of jft uses; it imports nothing of jft beyond this folder.

    errors.py    the exception types (`JftError` and its families) and exit codes
    rules.py     path rules: the one regex mechanism over parameter paths
    progress.py  progress bars on long work (quiet when not on a terminal)
    files.py     writing run files atomically, reading JSON/JSONL back with named errors, figures
    lock.py      one writer per run folder (an advisory lock with its owner's pid and host)
    fields.py    the rule types of config fields and hyperparameters (Int, Float, Choice, ...)
"""
