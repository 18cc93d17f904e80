"""Readiness stage: the production checklist computed from recorded evidence, and the skill-vs-knowledge advisor."""
