"""Serving trained adapters (layer 7: imports run/ and below; never studies/ or cli/).

An OpenAI-compatible HTTP server (`jft serve`) over one base model and many adapters, with
continuous batching: requests for different adapters decode in the same batch.

    engine.py   the batching engine, no HTTP: decode slots with a KV cache row each, a background
                thread that owns the device, adapters (LoRA, DoRA, IA3) stacked and gathered per
                slot; `load` restores run folders over one base and refuses what cannot share it
    app.py      the FastAPI app over an engine (/health, /v1/models, /v1/completions,
                /v1/chat/completions, streaming, OpenAI's errors) and `run`, uvicorn with a
                graceful SIGTERM
"""
