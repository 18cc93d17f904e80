"""`skilltune generate MODEL PROMPT...`: answer prompts with a base model or a trained adapter."""

from __future__ import annotations

from typing import Optional

import typer

from skilltune.cli.common import console, quiet_libraries


def generate(model: str = typer.Argument(..., help="A base model spec, a run directory or an adapter directory."),
             prompts: list[str] = typer.Argument(..., help="One or more user messages."),
             system: Optional[str] = typer.Option(None, help="System prompt."),
             max_new_tokens: int = typer.Option(128, help="Generation budget."),
             temperature: float = typer.Option(0.0, help="0 = greedy.")) -> None:
    """Answer PROMPTS with MODEL using its chat template (batched).

    Example: skilltune generate embedded:smollm2-135m-instruct "What is LoRA?"
    """
    quiet_libraries()
    from skilltune.evaluate.generate import generate as run_generate
    from skilltune.model.target import load_target

    target = load_target(model)
    if system is None and target.adapter_dir is not None:  # answer the way the model was trained to be asked
        import json
        from pathlib import Path

        run = Path(json.loads((target.adapter_dir / "skilltune_adapter.json").read_text()).get("run", ""))
        if (run / "config.yaml").is_file():
            from skilltune.config.load import load_config

            system = load_config(run / "config.yaml").data.system_prompt
    rendered = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        rendered.append(target.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    outs = run_generate(target.model, target.tokenizer, rendered, max_new_tokens=max_new_tokens,
                        temperature=temperature)
    for p, out in zip(prompts, outs):
        console.print(f"[bold cyan]user[/bold cyan]: {p}", highlight=False)
        console.print(f"[bold green]{target.label}[/bold green]: {out.text}", highlight=False, markup=False)
