"""Train-to-serve parity: does the exported artifact ask, stop and answer the way the registry version does?

Three checks on the version's held-out prompts (its test set):

1. template: the token ids the target feeds its model for each prompt (rendered the way
   that runtime renders it) equal the ids training used; the first difference is reported;
2. stop: the target stops on the end-of-turn token the model was trained to emit;
3. output: greedy answers of the exported artifact, loaded by an independent reader
   (plain transformers for a folder, transformers' GGUF reader for a GGUF file), against the
   registry version's answers: identical for >= 99% of prompts at full precision, the primary
   metric within 1 point at q8_0 and 3 points at q4_k_m (the measured cost is reported).

A client of a deployed export sends only its own messages: the target's template is given
them without the training system prompt, which the export supplies itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

IDENTICAL_SHARE = 0.99
METRIC_TOLERANCE = {"q8_0": 0.01, "q4_k_m": 0.03}  # the primary metric, in points of 1.0


@dataclass
class Target:
    """How one exported artifact is asked: its prompts as that runtime renders them, and its model."""

    label: str
    quant: str | None  # None or f32/f16: full precision; q8_0, q4_k_m: quantised
    render: Callable[[list[dict]], str]  # client messages -> the text the runtime tokenizes
    tokenizer: object
    stop_ids: set[int]
    stop_texts: list[str] = field(default_factory=list)
    load_model: Callable[[], object] | None = None  # None: no output check (an adapter is the version itself)
    single_turn: bool = False  # Ollama's TEMPLATE: one user message
    gguf_path: Path | None = None  # also checked in llama.cpp itself when llama-cpp-python is installed
    runtime_adds: str = ""  # the BOS text llama.cpp adds itself (so it is not given it in the prompt)


@dataclass
class Parity:
    ok: bool
    template: dict
    stop: dict
    output: dict | None
    runtime: dict | None = None  # llama.cpp itself (GGUF exports, when llama-cpp-python is installed)

    def to_json(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        t, s, o = self.template, self.stop, self.output
        out = [f"template parity: {'ok' if t['ok'] else 'FAILED'} - {t['identical']}/{t['n']} prompts give "
               f"the training token ids" + (f"; first difference: {t['first_difference']}" if not t["ok"] else ""),
               f"stop parity: {'ok' if s['ok'] else 'FAILED'} - trained end-of-turn {s['trained']!r} (id "
               f"{s['trained_id']}); the target stops on {s['target']}"]
        if o:
            line = (f"output parity: {'ok' if o['ok'] else 'FAILED'} - {o['identical']}/{o['n']} greedy answers "
                    f"identical ({o['identical_share']:.1%}); {o['metric']}: registry {o['registry_score']:.3f}, "
                    f"export {o['export_score']:.3f} (quantisation cost {o['cost_points']:+.1f} points; "
                    f"{o['rule']})")
            out.append(line)
        r = self.runtime
        if r:
            out.append(f"llama.cpp: {'ok' if r['ok'] else 'FAILED'} - its tokenizer gives the training ids for "
                       f"{r['template_identical']}/{r['n']} prompts; {r['metric']} {r['llama_cpp_score']:.3f} "
                       f"(registry {r['registry_score']:.3f}, {r['cost_points']:+.1f} points; {r['rule']}); "
                       f"{r['tokens_per_s']:.0f} tokens/s")
        return out


def _client_messages(messages: list[dict], system: str | None) -> list[dict]:
    """What a client sends: the conversation without the training system prompt the export supplies."""
    if system and messages and messages[0]["role"] == "system" and messages[0]["content"] == system:
        return messages[1:]
    return messages


def _first_difference(trained: list[int], got: list[int], train_tok, target_tok) -> str:
    n = next((i for i, (a, b) in enumerate(zip(trained, got)) if a != b), min(len(trained), len(got)))
    want = train_tok.convert_ids_to_tokens(trained[n]) if n < len(trained) else "(end)"
    have = target_tok.convert_ids_to_tokens(got[n]) if n < len(got) else "(end)"
    return f"token {n}: training has {want!r}, the target has {have!r}"


def check(version_target, examples, system: str | None, target: Target, metric, ctx: dict, max_new_tokens: int,
          batch_size: int, stages=None) -> Parity:
    """Run the three checks for ``target`` against ``version_target`` (the registry version, loaded)."""
    from skilltune.data.tokenize import prompt_text
    from skilltune.model.tokenizer import turn_end_token

    vt = version_target.tokenizer
    if target.single_turn:
        examples = [ex for ex in examples if len(_client_messages(ex.messages(with_last=False), system)) == 1]
    train_prompts = [prompt_text(vt, ex) for ex in examples]
    target_prompts = [target.render(_client_messages(ex.messages(with_last=False), system)) for ex in examples]
    trained_ids = [vt(p, add_special_tokens=False)["input_ids"] for p in train_prompts]
    target_ids = [target.tokenizer(p, add_special_tokens=False)["input_ids"] for p in target_prompts]
    same = [a == b for a, b in zip(trained_ids, target_ids)]
    bad = next((i for i, ok in enumerate(same) if not ok), None)
    template = {"ok": bool(examples) and all(same), "n": len(examples), "identical": sum(same),
                "first_difference": None if bad is None else
                f"prompt {bad + 1} (test line {examples[bad].line}): "
                + _first_difference(trained_ids[bad], target_ids[bad], vt, target.tokenizer)}
    end = turn_end_token(vt)
    end_id = vt.convert_tokens_to_ids(end)
    target_stop_ids = {target.tokenizer.convert_tokens_to_ids(t) for t in target.stop_texts} | target.stop_ids
    stop = {"ok": end_id in target_stop_ids or end in target.stop_texts, "trained": end, "trained_id": end_id,
            "target": sorted(f"{target.tokenizer.convert_ids_to_tokens(i)!s} ({i})" for i in target_stop_ids)}
    output = runtime = None
    if target.load_model is not None and examples:
        output, ours = _output(version_target, train_prompts, target, target_prompts, examples, metric, ctx,
                               max_new_tokens, batch_size, stages)
        if target.gguf_path is not None:
            runtime = _runtime(target, target_prompts, trained_ids, ours, examples, metric, ctx, max_new_tokens,
                               stages)
    ok = template["ok"] and stop["ok"] and (output is None or output["ok"]) and (runtime is None or runtime["ok"])
    return Parity(ok, template, stop, output, runtime)


def _runtime(target: Target, target_prompts, trained_ids, ours, examples, metric, ctx, max_new_tokens, stages):
    from skilltune.export import runtime
    from skilltune.progress import SILENT

    if not runtime.available():
        (stages or SILENT).message("llama.cpp itself not checked: llama-cpp-python is not installed (make llamacpp)")
        return None
    with (stages or SILENT).stage(f"answering them in llama.cpp itself ({target.label})"):
        own = target.runtime_adds
        prompts = [p[len(own):] if own and p.startswith(own) else p for p in target_prompts]
        return runtime.check(target.gguf_path, prompts, trained_ids, [g.text for g in ours],
                             [ex.completion for ex in examples], metric, ctx, max_new_tokens)


def _output(version_target, train_prompts, target: Target, target_prompts, examples, metric, ctx, max_new_tokens,
            batch_size, stages) -> dict:
    from skilltune.model.generate import generate
    from skilltune.progress import SILENT

    stages = stages or SILENT
    n = len(examples)
    with stages.stage(f"answering {n} held-out prompts with the registry version", total=n) as adv:
        ours = generate(version_target.model, version_target.tokenizer, train_prompts, max_new_tokens, batch_size,
                        progress=adv)
    with stages.stage(f"loading the export ({target.label}) with an independent reader"):
        try:
            model = target.load_model()
        except Exception as exc:  # noqa: BLE001 - whatever the reader raises, the export cannot be checked
            from skilltune.export.gguf import ExportError

            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportError(f"the export ({target.label}) could not be loaded back to check it: {why}",
                              hint="the runtime may not support this architecture yet; --no-check exports it "
                                   "unchecked (recorded as such)") from None
    eos = min(target.stop_ids) if target.stop_ids else None
    with stages.stage(f"answering them with the export ({target.label})", total=len(examples)) as adv:
        theirs = generate(model, target.tokenizer, target_prompts, max_new_tokens, batch_size, eos_token_id=eos,
                          progress=adv)
    refs = [ex.completion for ex in examples]
    reg = sum(metric.score(g.text, r, ctx) for g, r in zip(ours, refs)) / len(refs)
    exp = sum(metric.score(g.text, r, ctx) for g, r in zip(theirs, refs)) / len(refs)
    identical = sum(a.text == b.text for a, b in zip(ours, theirs))
    share = identical / len(refs)
    tolerance = METRIC_TOLERANCE.get(target.quant or "")
    if tolerance is None:
        ok, rule = share >= IDENTICAL_SHARE, f">= {IDENTICAL_SHARE:.0%} identical at full precision"
    else:
        ok, rule = reg - exp <= tolerance + 1e-9, f"{metric.name} within {tolerance * 100:.0f} points at {target.quant}"
    differing = [{"test_line": ex.line, "registry": a.text[:300], "export": b.text[:300]}
                 for ex, a, b in zip(examples, ours, theirs) if a.text != b.text][:5]
    return {"ok": ok, "n": len(refs), "identical": identical, "identical_share": share, "metric": metric.name,
            "registry_score": reg, "export_score": exp, "cost_points": (reg - exp) * 100, "rule": rule,
            "examples_differing": differing}, ours
