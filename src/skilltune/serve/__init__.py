"""Serving stage: an OpenAI-compatible server that follows a registry alias, with a request log."""
