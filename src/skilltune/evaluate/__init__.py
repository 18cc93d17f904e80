"""Evaluation stage: batched generation, metrics, base-vs-tuned reports."""
