"""jft's local lm-evaluation-harness tasks: YAML files over the data jft ships (`data/`), read offline.

    jft_sentiment        the 1,006 embedded test reviews as multiple choice: "Review: {text}\\nSentiment:" ->
                         " negative" | " positive" (the quickstart's prompt and label words), accuracy
    jft_alpaca_heldout   the held-out 10% of LLaMA-Factory's Alpaca demo (data.holdout=0.1, seed 0: the eval
                         split of configs/instruct.py): the responses' rolling log-likelihood, perplexities
    jft_chat             a held-out 10% of the embedded chat pairs (the same seeded split): greedy answers
                         until a newline, exact match against any response the file gives for that prompt

`utils.py` builds each task's rows from the files (`custom_dataset`); the data folder is the checkout's
`data/`, or JFT_DATA, or `data_dir` in the TaskManager's metadata.
"""
