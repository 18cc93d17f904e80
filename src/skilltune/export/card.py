"""The model card (``README.md`` with the Hub's YAML metadata) of an ``hf`` export.

Built with ``huggingface_hub``'s ``ModelCard``/``ModelCardData``: ``base_model``, ``license``,
tags, and the evaluation results as ``model-index`` (metric, base and finetuned, test-set size,
date); the body adds the data fingerprint, the registry lineage and how to serve it.
"""

from __future__ import annotations

from pathlib import Path

from skilltune.registry.db import Version

DEFAULT_LICENSE = "other"  # the Hub's value when the base model's licence is not known here


def base_identity(v: Version) -> tuple[str, str]:
    """The base model's Hub id (or the spec training used) and its licence id for the Hub."""
    from skilltune.model.sources import EMBEDDED

    spec = ((v.lineage.get("config") or {}).get("model") or {}).get("base") or "unknown"
    if spec.startswith("embedded:") and spec[len("embedded:"):] in EMBEDDED:
        m = EMBEDDED[spec[len("embedded:"):]]
        return m.hub_id or spec, m.license_id or DEFAULT_LICENSE
    return spec, DEFAULT_LICENSE


def build(v: Version, ref: str, merged: bool, system: str | None, license_id: str | None = None) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base, licence = base_identity(v)
    licence = license_id or licence
    ev = (v.metrics or {}).get("eval") or {}
    test = Path(ev.get("test_file") or "test set").name
    date = (ev.get("created") or "")[:10]
    results = []
    for name, m in (ev.get("metrics") or {}).items():
        for side in ("tuned", "base"):
            if m.get(side) is None:
                continue
            results.append(EvalResult(
                task_type="text-generation", dataset_type=test, dataset_name=f"{test} ({ev.get('n_examples')} "
                f"held-out examples, {date})", metric_type=name, metric_value=round(float(m[side]), 4),
                metric_name=f"{name} ({'finetuned' if side == 'tuned' else 'base model'})"))
    data = ModelCardData(base_model=base if "/" in base else None, license=licence, library_name=None if not merged
                         else "transformers", tags=["skilltune", "text-generation", v.method] + ([] if merged
                         else ["peft", "lora"]), model_name=ref.replace("@", "-"),
                         eval_results=results or None, pipeline_tag="text-generation")
    lineage = v.lineage or {}
    data_fp = lineage.get("data") or {}
    lines = [f"# {ref}", "",
             f"A {v.method} finetune of `{base}` made with skilltune "
             f"({'merged into the base weights' if merged else 'a peft adapter on the base model'}).", ""]
    if ev:
        lines += ["## Evaluation", "",
                  f"On {ev.get('n_examples')} held-out examples ({test}, {date}), greedy decoding:", "",
                  "| metric | base model | finetuned |", "|---|---|---|"]
        lines += [f"| {n} | {m.get('base', float('nan')):.3f} | {m.get('tuned', float('nan')):.3f} |"
                  for n, m in (ev.get("metrics") or {}).items()]
        lines.append("")
    lines += ["## Lineage", "",
              f"- registry version: `{ref}` (created {v.created:%Y-%m-%d %H:%M} UTC)",
              f"- base model: `{base}` (hash `{lineage.get('base_model')}`)",
              f"- training data: sha256 `{(data_fp.get('train') or {}).get('sha256', '?')}` "
              f"({(data_fp.get('train') or {}).get('examples', '?')} examples)",
              f"- skilltune {lineage.get('skilltune_version', '?')}, git commit `{lineage.get('git_commit')}`",
              f"- final train loss {lineage.get('final_train_loss')}, "
              f"best validation loss {lineage.get('best_val_loss')}",
              ""]
    if system:
        lines += ["## System prompt", "",
                  "The model was trained with this system prompt; the chat template supplies it when a "
                  "conversation has none:", "", "```", system, "```", ""]
    lines += ["## Use", "", "```bash",
              "vllm serve ." if merged else f"vllm serve {base} --enable-lora --lora-modules {ref.split('@')[0]}=.",
              "```", ""]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines))
    return str(card)


def validate(folder: Path) -> list[str]:
    """Problems with ``folder`` as a Hub model repo (no network): a card with parsable metadata and weights."""
    from huggingface_hub import ModelCard

    problems = []
    readme = folder / "README.md"
    if not readme.is_file():
        return ["no README.md (model card)"]
    try:
        card = ModelCard.load(readme)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a problem to report
        return [f"README.md: the model card's metadata does not parse ({exc})"]
    meta = card.data.to_dict()
    for key in ("license", "tags"):
        if not meta.get(key):
            problems.append(f"README.md: no {key} in the metadata")
    if "model-index" not in meta and "eval_results" not in meta:
        problems.append("README.md: no evaluation results (model-index): evaluate the version first "
                        "(skilltune eval NAME@vN)")
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        problems.append("no .safetensors weights")
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        problems.append("no config.json or adapter_config.json")
    return problems
