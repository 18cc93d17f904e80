"""`skilltune demo`: the whole workflow on the embedded SmolLM2 model."""

from __future__ import annotations

import typer

from skilltune.cli.common import console, quiet_libraries


def demo() -> None:
    """Run the main job on embedded defaults.

    Example: skilltune demo
    """
    quiet_libraries()
    from skilltune.evaluate.generate import generate
    from skilltune.model.target import load_target

    target = load_target("embedded:smollm2-135m-instruct")
    prompt = "In one sentence, what does finetuning a language model do?"
    text = target.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
    out = generate(target.model, target.tokenizer, [text], max_new_tokens=64)[0]
    console.print(f"[bold]prompt[/bold]: {prompt}")
    console.print(f"[bold]embedded SmolLM2-135M-Instruct[/bold]: {out.text}", markup=False)
