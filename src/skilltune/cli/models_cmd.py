"""`skilltune models list|info`: what models are available here, and facts about one."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from skilltune.cli.common import console, human_bytes, quiet_libraries

app = typer.Typer(help="List and inspect models.\n\nExample: skilltune models info embedded:smollm2-135m-instruct",
                  no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """Embedded models, converted models in the skilltune cache, and models in the HF cache.

    Example: skilltune models list
    """
    from skilltune.model.info import list_models

    table = Table("model", "status", "path", "description")
    for row in list_models():
        table.add_row(row["model"], row["status"], row["path"], row["description"])
    console.print(table)


@app.command()
def info(model: str = typer.Argument(..., help="embedded:NAME, a model directory, a .gguf file, a cached hub id, "
                                               "a run or adapter directory, or a registry version (NAME@vN)."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Architecture, parameter count, context length, chat template, dtype and disk size of MODEL.

    Example: skilltune models info embedded:smollm2-135m-instruct
    """
    quiet_libraries()
    from pathlib import Path

    from skilltune.model.info import artifact_info, model_info
    from skilltune.model.target import find_artifact
    from skilltune.registry.api import resolve_spec

    spec, policy = resolve_spec(model)
    artifact = find_artifact(Path(spec)) if Path(spec).is_dir() else None
    facts = artifact_info(artifact, policy.base) if artifact is not None else model_info(spec)
    if as_json:
        console.print_json(json.dumps(facts))
        return
    table = Table("field", "value", show_header=False)
    for key in ("model", "source", "path", "architecture", "layers", "hidden_size", "context_length",
                "vocab_size", "dtype_on_disk", "eos_token", "pad_token", "chat_template_source"):
        table.add_row(key, str(facts[key]))
    table.add_row("parameters", f"{facts['parameters']:,} ({facts['parameters'] / 1e6:.1f} M)")
    table.add_row("disk size", human_bytes(facts["disk_size_bytes"]))
    for key in ("base_model", "method", "adapter", "system_prompt"):
        if facts.get(key) is not None:
            table.add_row(key, str(facts[key]))
    console.print(table)
    console.print("[bold]chat template in use[/bold]:")
    console.print(facts["chat_template"], markup=False, highlight=False)


@app.command()
def families(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The model families skilltune is tested on: template, end-of-turn token, structure, CPU kernels, shared
    prefix, running batch, and the real weights run here.

    Example: skilltune models families
    """
    from skilltune.model.families import matrix

    rows = matrix()
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("family", "model_type", "chat template (when the model has none)", "end of turn", "structure",
                  "CPU training kernels", "shared prefix", "running batch", "real weights run here",
                  caption="Every family passes one contract on a tiny random model with its structure "
                          "(tests/test_families.py): LoRA, DoRA and full training; the kernels' loss equal to the "
                          "stock path's; template and end-of-turn token; merge; interrupt and resume; generate, "
                          "eval, registry, serve, export. A kernel that steps aside leaves the stock path running. "
                          "Generation prepacks linear weights on every family.")
    for r in rows:
        table.add_row(r["family"], ", ".join(r["model_types"]), r["chat_template"], r["end_of_turn"], r["structure"],
                      "; ".join([", ".join(r["kernels"]), *(f"{k} steps aside" for k in r["kernels_step_aside"])]),
                      r["shared_prefix"], r["running_batch"], r["real_weights"] or "-")
    console.print(table)
