"""Serving trained adapters (layer 7: imports run/ and below; never studies/ or cli/).

An OpenAI-compatible HTTP server (`jft serve`) over one base model and many adapters, with
continuous batching: requests for different adapters decode in the same batch.
"""
