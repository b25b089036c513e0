"""Serving: `moe serve`, an OpenAI-compatible HTTP server over a continuous-batching engine.

engine.py  the decode rows, their cache, prefill in chunks between decode steps
app.py     the FastAPI application: OpenAI's completions, chat, models; health; metrics
"""
