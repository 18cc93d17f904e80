"""`skilltune export REF --format F`: one registered version, shipped to where the team runs it.

Formats are registered (:data:`FORMATS`): ``adapter`` (the peft adapter), ``hf`` (merged into
its base: transformers, vLLM, TGI, the Hub, SageMaker/Vertex containers), ``gguf``
(llama.cpp) and ``ollama`` (the GGUF plus a Modelfile). Every one starts from the registry's
verified checkout (never a run directory), carries the training chat template with the
training system prompt as its default and the end-of-turn token as its stop, and is checked
for train-to-serve parity (:mod:`skilltune.export.parity`) before it is moved into place: a
failed check leaves nothing behind and exits 1, unless ``--force``. The outcome is recorded
on the version (``registry show``; the readiness checklist reads it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from skilltune.export import card, gguf, ollama
from skilltune.export.gguf import ExportError
from skilltune.export.parity import Parity, Target, check
from skilltune.model.target import ADAPTER_META, load_target, read_adapter_meta
from skilltune.model.tokenizer import turn_end_token, with_default_system
from skilltune.paths import atomic_dir
from skilltune.progress import SILENT, Stages
from skilltune.registry.api import Checkout, Registry, version_system_prompt


@dataclass
class ExportRequest:
    ref: str
    out: Path
    format: str = "hf"
    quant: str = "q8_0"  # gguf and ollama
    force: bool = False  # keep (and record) an export whose parity check failed
    check: bool = True  # False: no parity check (recorded as unchecked)
    test_file: str | None = None  # held-out prompts; default: the version's test set
    limit: int | None = None  # at most this many prompts for the check
    db: str | None = None  # the SQLite database of sql metrics, when it moved
    trust_remote_code: bool = False
    destination: str | None = None  # where the result ends up, for the record (default: out)
    record: bool = True  # record the outcome on the version


@dataclass
class Job:
    """One export under way: the version, and what its builders share (the merged model is made once)."""

    req: ExportRequest
    co: Checkout
    system: str | None
    stages: Stages
    _merged: tuple | None = None

    @property
    def name(self) -> str:
        return f"{self.co.version.name}-v{self.co.version.number}"

    def merged(self) -> tuple:
        """(model, tokenizer) of the version with LoRA merged in and the export's template and stop set."""
        if self._merged is None:
            with self.stages.stage("loading the base model and merging the adapter into it"):
                target = load_target(str(self.co.path), torch.float32, self.co.policy)
                model = target.model.merge_and_unload() if hasattr(target.model, "merge_and_unload") else target.model
            tokenizer = target.tokenizer
            if self.system:  # vLLM, TGI, llama.cpp and transformers then ask the way training did
                tokenizer.chat_template = with_default_system(tokenizer.chat_template, self.system)
            end_id = tokenizer.convert_tokens_to_ids(turn_end_token(tokenizer))
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = end_id
            model.config.eos_token_id = end_id
            self._merged = (model, tokenizer)
        return self._merged

    def write_merged(self, folder: Path) -> None:
        model, tokenizer = self.merged()
        with self.stages.stage(f"writing the merged model ({sum(p.numel() for p in model.parameters()):,} "
                               "parameters)"):
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)


@dataclass
class Format:
    name: str
    description: str
    write: Callable[[Job, Path], Target]  # fill the folder; return how the parity check asks the result
    quantised: bool = False


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> None:
    FORMATS[fmt.name] = fmt


# ---------------------------------------------------------------- the formats
def _tokenizer_target(label: str, folder: Path, load_model: Callable | None) -> Target:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if (folder / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(str(folder)).eos_token_id
        stops |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return Target(label, None, lambda msgs: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                  tok, stops, load_model=load_model)


def _shareable_record(artifact: Path) -> dict:
    """The artifact's skilltune record without the training machine's run path (the export may be shared)."""
    record = json.loads((artifact / ADAPTER_META).read_text())
    record.pop("run", None)
    return record


def _write_adapter(job: Job, tmp: Path) -> Target:
    shutil.copytree(job.co.path, tmp, dirs_exist_ok=True)
    (tmp / ADAPTER_META).write_text(json.dumps(_shareable_record(job.co.path), indent=2))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp), trust_remote_code=False)
    if job.system:
        tokenizer.chat_template = with_default_system(tokenizer.chat_template, job.system)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(card.build(job.co.version, job.co.ref, merged=False, system=job.system))
    return _tokenizer_target("peft adapter", tmp, None)  # it is the version's own weights: no output check


def _write_hf(job: Job, tmp: Path) -> Target:
    job.write_merged(tmp)
    (tmp / "skilltune_export.json").write_text(json.dumps({"from": job.co.ref, "merged": True,
                                                           **_shareable_record(job.co.path),
                                                           "system_prompt": job.system}, indent=2))
    (tmp / "README.md").write_text(card.build(job.co.version, job.co.ref, merged=True, system=job.system))

    def load():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, trust_remote_code=False)

    return _tokenizer_target("merged transformers folder", tmp, load)


def _gguf_target(job: Job, path: Path, info: gguf.GGUFInfo) -> tuple[object, Callable[[str], str], Callable, str]:
    """The GGUF's own tokenizer (transformers' GGUF reader), llama.cpp's BOS rule, a model loader, and the BOS
    text llama.cpp adds by itself ("" when the file says not to)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - transformers' GGUF tokenizer reader covers some vocabularies only
        from skilltune.export import runtime

        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if job.req.check and not runtime.available():
            raise ExportError(f"transformers cannot read the tokenizer back from {path.name} ({why}), so the "
                              "prompts cannot be checked token by token here",
                              hint="make llamacpp (llama.cpp then checks the file itself), or --no-check to "
                                   "export unchecked") from None
        if job.req.check:
            job.stages.message(f"transformers cannot read {path.name}'s tokenizer ({why}); the token ids are "
                               "checked by llama.cpp's own tokenizer, the answers with the export's tokenizer")
        tok = job.merged()[1]
    bos = tok.convert_ids_to_tokens(info.bos_id) if info.bos_id is not None else ""

    def llama_cpp_text(text: str) -> str:
        # llama.cpp drops a BOS the template wrote and adds its own when the file says so
        if info.add_bos:
            return bos + (text[len(bos):] if bos and text.startswith(bos) else text)
        return text

    def load():
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)

    return tok, llama_cpp_text, load, bos if info.add_bos else ""


def _write_gguf_file(job: Job, tmp: Path) -> tuple[Path, gguf.GGUFInfo]:
    path = tmp / f"{job.name}-{job.req.quant}.gguf"
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".merged-") as merged:
        job.write_merged(Path(merged))
        with job.stages.stage(f"converting to GGUF ({job.req.quant}) with llama.cpp's converter"):
            gguf.convert(Path(merged), path, job.req.quant)
    return path, gguf.read_info(path)


def _write_gguf(job: Job, tmp: Path) -> Target:
    path, info = _write_gguf_file(job, tmp)
    if not info.chat_template:
        raise ExportError(f"{path.name} carries no chat template, so llama.cpp would not ask the way training did")
    tok, llama_cpp_text, load, adds = _gguf_target(job, path, info)

    def render(msgs):
        return llama_cpp_text(tok.apply_chat_template(msgs, chat_template=info.chat_template, tokenize=False,
                                                      add_generation_prompt=True))

    return Target(f"GGUF {job.req.quant}", job.req.quant, render, tok, info.stop_ids, load_model=load, gguf_path=path,
                  runtime_adds=adds)


def _write_ollama(job: Job, tmp: Path) -> Target:
    path, info = _write_gguf_file(job, tmp)
    _, tokenizer = job.merged()
    end = turn_end_token(tokenizer)
    mf = ollama.derive(tokenizer, path.name, job.system, end, strip_bos=info.add_bos)
    (tmp / "Modelfile").write_text(mf.text())
    mf = ollama.parse((tmp / "Modelfile").read_text())  # check what was written, not what was meant
    tok, llama_cpp_text, load, adds = _gguf_target(job, path, info)

    def render(msgs):
        return llama_cpp_text(ollama.render(mf.template, mf.system, msgs[-1]["content"]))

    return Target(f"Ollama Modelfile + GGUF {job.req.quant}", job.req.quant, render, tok, set(), mf.stops,
                  load_model=load, single_turn=True, gguf_path=path, runtime_adds=adds)


register_format(Format("adapter", "the peft adapter with its model card (vLLM --enable-lora, TGI, the Hub)",
                       _write_adapter))
register_format(Format("hf", "merged into the base: transformers, vLLM, TGI, the Hub, SageMaker/Vertex",
                       _write_hf))
register_format(Format("gguf", "one GGUF file for llama.cpp (--quant f16, q8_0, q4_k_m)", _write_gguf, True))
register_format(Format("ollama", "the GGUF plus a Modelfile (TEMPLATE, stop, SYSTEM from training)",
                       _write_ollama, True))


# ---------------------------------------------------------------- the workflow
@dataclass
class ExportResult:
    out: Path
    parity: Parity | None
    record: dict = field(default_factory=dict)
    command: str | None = None  # what to run next (Ollama)


def export(registry: Registry, req: ExportRequest, stages: Stages = SILENT) -> ExportResult:
    """Build ``req.format`` for ``req.ref`` in ``req.out``, check parity, record the outcome on the version."""
    fmt = FORMATS.get(req.format)
    if fmt is None:
        raise ExportError(f"unknown export format {req.format!r}", hint=f"use one of {', '.join(FORMATS)}")
    if fmt.quantised and req.quant not in gguf.QUANTS:
        raise ExportError(f"unknown GGUF quantisation {req.quant!r}", hint=f"use one of {', '.join(gguf.QUANTS)}")
    out = Path(req.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder", hint="choose a new folder")
    with stages.stage(f"verifying {req.ref} from the registry store"):
        co = registry.checkout(req.ref, req.trust_remote_code)
    read_adapter_meta(co.path)  # a readable skilltune artifact
    job = Job(req, co, version_system_prompt(co.version), stages)
    held_out = _held_out(job) if req.check else None  # fails before any work when the check cannot run
    with atomic_dir(out) as tmp:
        target = fmt.write(job, tmp)
        parity = _check(job, target, held_out) if held_out else None
        if parity is not None and not parity.ok and not req.force:
            if req.record:
                _record(registry, job, out, parity, kept=False)
            raise ExportFailed(parity, out)
    record = _record(registry, job, out, parity, kept=True) if req.record else {}
    command = f"ollama create {job.name} -f {out / 'Modelfile'}" if req.format == "ollama" else None
    return ExportResult(out, parity, record, command)


class ExportFailed(ExportError):
    def __init__(self, parity: Parity, out: Path):
        super().__init__("the export does not behave like the registry version:\n  " + "\n  ".join(parity.lines()),
                         hint=f"nothing was written to {out}; fix the cause, or pass --force to keep it anyway "
                              "(recorded as failed: the readiness checklist will show it)")
        self.parity = parity


@dataclass
class HeldOut:
    examples: list
    metric: object
    ctx: dict
    max_new_tokens: int
    batch_size: int


def _held_out(job: Job) -> HeldOut:
    """The version's test set and primary metric, from the config the registry kept."""
    from skilltune.config.load import config_from_dict
    from skilltune.data.reader import load_examples
    from skilltune.evaluate.metrics import resolve_metrics

    run_config = job.co.version.lineage.get("run_config")
    if run_config is None:
        raise ExportError(f"{job.co.ref} was registered without its config, so its held-out prompts are unknown",
                          hint="pass --test FILE for the parity check, or --no-check to export unchecked")
    cfg = config_from_dict(run_config, None, source=f"the registry's config of {job.co.ref}")
    test = job.req.test_file or cfg.data.test
    if not test or not Path(test).is_file():
        raise ExportError(f"the parity check needs {job.co.ref}'s held-out prompts; its test set "
                          f"{test or '(none configured)'} is not here",
                          hint="pass --test FILE (prompt/completion rows), or --no-check to export unchecked")
    examples = load_examples(test, cfg.data.format, cfg.data.columns, cfg.data.system_prompt)
    if job.req.limit:
        examples = examples[:job.req.limit]
    metric = resolve_metrics(cfg.eval.metrics[:1])[0]
    db = job.req.db or cfg.eval.db
    if metric.name.startswith("sql") and not (db and Path(db).is_file()):
        raise ExportError(f"the parity check scores {metric.name}, which needs the SQLite database; {db!r} is not here",
                          hint="pass --db FILE, or --no-check to export unchecked")
    return HeldOut(examples, metric, {"db": db, "json_schema": cfg.eval.json_schema}, cfg.eval.max_new_tokens,
                   cfg.eval.batch_size)


def _check(job: Job, target: Target, held: HeldOut) -> Parity:
    job.stages.message(f"checking train-to-serve parity on {len(held.examples)} held-out prompts")
    version = load_target(str(job.co.path), torch.float32, job.co.policy)
    if hasattr(version.model, "merge_adapter"):
        version.model.merge_adapter()  # the registry version as `skilltune serve` runs it
    return check(version, held.examples, job.system, target, held.metric, held.ctx, held.max_new_tokens,
                 held.batch_size, job.stages)


def _record(registry: Registry, job: Job, out: Path, parity: Parity | None, kept: bool) -> dict:
    key = job.req.format + (f":{job.req.quant}" if FORMATS[job.req.format].quantised else "")
    where = job.req.destination or str(out.resolve())
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "out": where if kept else None,
              "checked": parity is not None, "ok": parity.ok if parity else None,
              "forced": bool(parity and not parity.ok and kept), "parity": parity.to_json() if parity else None}
    exports = dict((registry.get(job.co.ref).metrics or {}).get("exports") or {})
    exports[key] = record
    registry.attach_metrics(job.co.ref, "exports", exports)
    return record
