"""Training stage: `skilltune train` — LoRA, QLoRA, DoRA, full finetuning with exact resume."""
