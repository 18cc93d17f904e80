"""skilltune: teach an open LLM a new skill — audit data, finetune, evaluate, ship with rollback."""

__version__ = "0.1.0"
