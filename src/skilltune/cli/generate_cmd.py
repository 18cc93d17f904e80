"""`skilltune generate MODEL PROMPT...`: answer prompts with a base model or a trained adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rich.markup import escape

from skilltune.cli.common import console, quiet_libraries


def generate(model: str = typer.Argument(..., help="A base model spec, a run or adapter directory, or a registry "
                                                   "version (NAME@vN, NAME@alias)."),
             prompts: list[str] = typer.Argument(..., help="One or more user messages."),
             system: Optional[str] = typer.Option(None, help="System prompt (default: the one the model was "
                                                             "trained with, if any)."),
             max_new_tokens: int = typer.Option(128, min=1, help="Generation budget."),
             temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
             top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling's mass "
                                                   "when sampling (default: the model's generation config)."),
             seed: Optional[int] = typer.Option(None, "--seed", help="Sampling: each prompt draws from its own "
                                                "stream seeded with this (the same seed, the same answers)."),
             precision: str = typer.Option("auto", help="Weights: auto (bf16 where the CPU computes it fast, as "
                                                        "eval and serve), bf16 or fp32."),
             json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="A JSON Schema file: each answer "
                                                        "is decoded under its grammar (structured output)."),
             json_object: bool = typer.Option(False, "--json", help="Each answer is one JSON object."),
             grammar_file: Optional[Path] = typer.Option(None, "--grammar", help="A Lark grammar file: each answer "
                                                         "is decoded under it (e.g. `skilltune data sql-grammar DB`)."),
             base: Optional[str] = typer.Option(None, "--base", help="Load the adapter onto this base model "
                                                                     "(its hash must match the adapter's record)."),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                    help="Run modelling code shipped with the base model.")) -> None:
    """Answer PROMPTS with MODEL using its chat template (batched).

    Example: skilltune generate embedded:smollm2-135m-instruct "What is LoRA?"
    """
    quiet_libraries()
    from dataclasses import replace

    from skilltune.model.generate import generate as run_generate
    from skilltune.model.structured import GrammarError, vocab_width
    from skilltune.model.target import load_target, training_system_prompt
    from skilltune.model.tokenizer import render_prompt
    from skilltune.registry.api import resolve_spec

    grammar, flag = _grammar(json_schema, json_object, grammar_file)
    spec, policy = resolve_spec(model, trust_remote_code)
    if base:
        policy = replace(policy, base=base)
    target = load_target(spec, dtype=_dtype(precision), policy=policy)
    if system is None and target.adapter_dir is not None:  # answer the way the model was trained to be asked
        system = training_system_prompt(target.adapter_dir)
    rendered = [render_prompt(target.tokenizer, p, system) for p in prompts]
    if grammar is not None:
        try:
            grammar.check(target.tokenizer, target.tokenizer.eos_token_id, vocab_width(target.model, target.tokenizer))
        except GrammarError as exc:
            raise typer.BadParameter(str(exc), param_hint=flag) from None
    outs = run_generate(target.model, target.tokenizer, rendered, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p or None, seed=seed,
                        grammars=[grammar] * len(rendered))  # each row builds its own matcher from it
    for p, out in zip(prompts, outs):
        console.print(f"[bold cyan]user[/bold cyan]: {escape(p)}", highlight=False)
        console.print(f"[bold green]{escape(target.label)}[/bold green]: {escape(out.text)}", highlight=False)


def _grammar(schema_file: Optional[Path], json_object: bool, grammar_file: Optional[Path]):
    """The grammar --json-schema / --json / --grammar ask for (None: plain text) and the flag that asked; a bad file
    or schema is a usage error."""
    from skilltune.model.structured import RESPONSE_FORMATS, GrammarError

    asked = {flag: (fmt, source) for flag, fmt, source, given in (
        ("--json-schema", "json_schema", schema_file, schema_file is not None),
        ("--json", "json_object", None, json_object),
        ("--grammar", "grammar", grammar_file, grammar_file is not None)) if given}
    if len(asked) > 1:
        raise typer.BadParameter(f"give one of {', '.join(asked)}", param_hint=list(asked)[-1])
    flag, (fmt, source) = next(iter(asked.items()), ("", ("text", None)))
    try:
        return RESPONSE_FORMATS[fmt](source), flag
    except GrammarError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None


def _dtype(precision: str):
    from skilltune.train.precision import INFERENCE_DTYPES, inference_dtype

    if precision != "auto" and precision not in INFERENCE_DTYPES:
        raise typer.BadParameter(f"{precision!r} is not one of auto, {', '.join(INFERENCE_DTYPES)}",
                                 param_hint="--precision")
    return inference_dtype(precision)[1]
