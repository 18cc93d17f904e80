"""`skilltune train`: the training workflow, :func:`train` = :func:`setup` -> :func:`fit` -> :func:`finish`.

setup (data checks, run directory, model + method, optimizer, resume) builds a
:class:`Session`; fit runs the steps (:func:`train_step`), :func:`validate` and
checkpoints; finish writes the artifact, summary and plot. The loop's own state is a
:class:`LoopState` that checkpoints serialise. Data-parallel runs go through
accelerate; the step plan is a pure function of the step number, so every process
and every resume agrees on the data.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from skilltune.config.load import dump_config
from skilltune.config.schema import SkilltuneConfig
from skilltune.errors import TrainingError, is_disk_full
from skilltune.model.loading import load_model, load_tokenizer
from skilltune.model.sources import model_fingerprint
from skilltune.model.target import ADAPTER_META
from skilltune.paths import atomic_dir, atomic_write_text, file_fingerprint, hold_exclusive, lock_holder
from skilltune.train import checkpoint as ckpt
from skilltune.train.batches import StepPlan
from skilltune.train.kernels import install_kernels, skipped_kernels
from skilltune.train.methods import METHODS, trainable_summary
from skilltune.train.objectives import OBJECTIVES
from skilltune.train.precision import choose_precision
from skilltune.train.reporter import Reporter
from skilltune.train.prepare import preflight, prepare_data
from skilltune.train.rundir import environment, latest_run_dir, new_run_dir, plot_losses
from skilltune.train.trackers import Trackers

# Config fields that may change between a run and its resume without changing the result.
_RESUME_IGNORED = {("train", "output_dir"), ("train", "report_to"), ("train", "logging_steps"),
                   ("train", "save_steps"), ("train", "save_total_limit"), ("train", "threads")}


class TrainingInterrupted(TrainingError):
    exit_code = 130


@dataclass
class TrainResult:
    run_dir: Path
    artifact_dir: Path
    summary: dict = field(default_factory=dict)


def _identity(cfg: SkilltuneConfig, data_fp: dict, base_hash: str, template: dict) -> dict:
    conf = cfg.model_dump(mode="json")
    for section, key in _RESUME_IGNORED:
        conf[section].pop(key, None)
    conf.pop("eval", None)
    conf.pop("serve", None)
    return {"config": conf, "data": data_fp, "base_model": base_hash, "template": template}


def _template_identity(tokenizer, info) -> dict:
    """The chat template the examples are rendered with, and the end token trained: a resume must render the same
    text, also when no config field changed (the model's own template edited, a default that changed with an
    upgrade)."""
    import hashlib

    text = tokenizer.chat_template or ""
    return {"source": info.chat_template_source, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "end_token": info.eos_token}


def _saved_template(run_path: Path, current: dict) -> dict:
    """A checkpoint written before the template was part of its identity: the run record's template source and end
    token (its text's hash was not recorded, so that is taken as unchanged)."""
    try:
        recorded = json.loads((run_path / "run.json").read_text())["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        return current
    return {**current, "source": recorded.get("chat_template_source"), "end_token": recorded.get("eos_token")}


def _check_disk(run_dir: Path, model, cfg: SkilltuneConfig) -> None:
    trainable, _ = trainable_summary(model)
    need = trainable * 4 * 3 * (cfg.train.save_total_limit + 2) + (64 << 20)  # weights + 2 Adam moments
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise TrainingError(f"not enough disk space in {run_dir}: {free / 2**30:.2f} GiB free, "
                            f"checkpoints need about {need / 2**30:.2f} GiB",
                            hint="free space, lower train.save_total_limit, or set train.output_dir elsewhere")


def _resolve_run_dir(cfg, run_name, resume, run_dir) -> tuple[Path, bool]:
    if run_dir is not None:
        run_dir = Path(run_dir)
        if resume and not (run_dir / "run.json").is_file():
            raise TrainingError(f"{run_dir} is not a skilltune run directory (no run.json)")
        if not resume and run_dir.exists() and any(run_dir.iterdir()):
            raise TrainingError(f"run directory {run_dir} already exists and is not empty",
                                hint="pass --resume to continue it, or choose another --run-dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, resume
    if resume:
        found = latest_run_dir(cfg.train.output_dir, run_name)
        if found is None:
            raise TrainingError(f"--resume: no earlier run named '{run_name}' in {cfg.train.output_dir}",
                                hint="pass --run-dir RUN_DIR, or drop --resume to start a new run")
        return found, True
    return new_run_dir(cfg.train.output_dir, run_name), False


@dataclass
class LoopState:
    """What the step loop carries from step to step; a checkpoint's ``loop.json``."""

    step: int = 0
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    tokens: int = 0  # tokens of the examples trained on
    computed_tokens: int = 0  # positions the model ran (shared prefixes take away, padding adds)
    train_time_s: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "LoopState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # older checkpoints lack newer fields


@dataclass
class Session:
    """Everything :func:`setup` builds for one run; :func:`fit` and :func:`finish` read it."""

    cfg: SkilltuneConfig
    acc: object  # accelerate.Accelerator
    reporter: Reporter
    run_name: str
    run_path: Path
    resuming: bool
    latest: Path | None  # the checkpoint resumed from
    identity: dict
    base_hash: str
    source: object  # ResolvedModel
    tokenizer: object
    tok_info: object
    data: object  # PreparedData
    method: object  # Method
    precision: str
    objective: object  # Objective (train/objectives.py)
    model: torch.nn.Module = None
    loss_fn: object = None
    optimizer: object = None
    scheduler: object = None
    params: list = field(default_factory=list)
    plan: StepPlan | None = None
    total_steps: int = 0
    eval_every: int = 1
    kernels: dict = field(default_factory=dict)
    undo_kernels: object = lambda: None
    undo_noise: object = lambda: None  # NEFTune's hook off again
    share_prefix: str | None = None
    share_prefix_refusal: str | None = None  # why this model cannot use the shared-prefix layout
    trainable: int = 0
    total: int = 0
    trackers: Trackers | None = None
    loop: LoopState = field(default_factory=LoopState)

    @property
    def ckpt_root(self) -> Path:
        return self.run_path / "checkpoints"


def train(cfg: SkilltuneConfig, run_name: str = "run", resume: bool = False, run_dir: str | Path | None = None,
          force: bool = False, reporter: Reporter | None = None, stop_after: int | None = None) -> TrainResult:
    """Finetune ``cfg.model.base`` on ``cfg.data`` and write a run directory.

    Args:
        run_name: prefix of the run directory ``<output_dir>/<run_name>-<timestamp>``.
        resume: continue the latest complete checkpoint of the run (``run_dir`` or latest ``run_name``).
        force: resume even if the config or data changed since the checkpoint.
        stop_after: stop (as if interrupted, checkpoint written) after this many steps; for tests.
    """
    try:
        s = setup(cfg, run_name, resume, run_dir, force, reporter or Reporter())
        try:
            fit(s, stop_after)
            return finish(s)
        except Exception as exc:
            if is_disk_full(exc):
                raise _disk_full(s) from None
            raise
    finally:
        while _HELD:  # the run directory's lock: released however training ended (a kill releases it too)
            _HELD.popitem()[1].close()


def _disk_full(s: Session) -> TrainingError:
    """What a full disk cost and how to go on: every checkpoint is written whole or not at all."""
    done = ckpt.complete_checkpoints(s.ckpt_root)
    room = "free space (or lower train.save_total_limit, or set train.output_dir on a bigger disk), then "
    if not done:
        return TrainingError(f"the disk filled up while training wrote to {s.run_path} (step {s.loop.step}), before "
                             "any checkpoint was complete; nothing half-written was kept",
                             hint=room + "train again")
    return TrainingError(
        f"the disk filled up while training wrote to {s.run_path} (step {s.loop.step}); the last complete "
        f"checkpoint, {done[-1].name}, is intact and nothing half-written was kept",
        hint=room + f"continue where it stopped: skilltune train CONFIG --resume --run-dir {s.run_path}")


# ---------------------------------------------------------------- setup
def setup(cfg: SkilltuneConfig, run_name: str, resume: bool, run_dir: str | Path | None, force: bool,
          reporter: Reporter) -> Session:
    """Data first (cheap, fails fast), then the run directory, then the model, optimizer and resume."""
    preflight(cfg)
    acc, precision, autocast_dtype = _accelerator(cfg)
    tokenizer, tok_info, source = load_tokenizer(cfg.model)
    cfg = _inherit_system_prompt(cfg, source, reporter)
    data = prepare_data(cfg, tokenizer)
    data_fp = {"train": file_fingerprint(cfg.data.train, len(data.train_examples) + (0 if cfg.data.val else len(data.val))),
               "val": file_fingerprint(cfg.data.val, len(data.val)) if cfg.data.val else None}
    base_hash = model_fingerprint(source.path)
    identity = _identity(cfg, data_fp, base_hash, _template_identity(tokenizer, tok_info))
    run_path, resuming = _shared_run_dir(acc, cfg, run_name, resume, run_dir)
    latest = _resume_point(run_path / "checkpoints", resuming, identity, force)
    s = Session(cfg, acc, reporter, run_name, run_path, resuming, latest, identity, base_hash, source, tokenizer,
                tok_info, data, METHODS[cfg.adapter.method], precision, OBJECTIVES[cfg.train.objective])
    _setup_model(s, autocast_dtype)
    if latest is not None:  # into the whole model, before FSDP or DeepSpeed shard it
        ckpt.load_trainable_state(s.model, ckpt.load_trainable_file(latest))
    _setup_optimizer(s, autocast_dtype)
    if acc.is_main_process:
        _write_run_record(s)
    s.objective.start(s)  # DPO: the reference log-probabilities of the starting model
    if latest is not None:
        _restore(s)
    s.trackers = (Trackers(run_path, cfg.train.report_to, cfg.model_dump(mode="json"), cfg.train.logging_steps)
                  if acc.is_main_process else None)
    return s


def _inherit_system_prompt(cfg: SkilltuneConfig, source, reporter: Reporter) -> SkilltuneConfig:
    """Training on top of a registered version: its system prompt, unless the config sets one (the version
    answers in the context it was trained in; a round without it would train another distribution)."""
    if source.kind != "registry" or cfg.data.system_prompt:
        return cfg
    from skilltune.registry.api import Registry, version_system_prompt

    system = version_system_prompt(Registry().get(source.spec))
    if not system:
        return cfg
    reporter.message(f"data.system_prompt: {system!r}, as {source.spec} was trained")
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"system_prompt": system})})


def _accelerator(cfg: SkilltuneConfig):
    """The accelerator and the compute precision; fp16 gets accelerate's loss scaling (a GradScaler)."""
    from accelerate import Accelerator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, autocast_dtype = choose_precision(cfg.train.precision, device)
    # accelerate runs the accumulation (train_step): under DeepSpeed the engine must know the
    # micro-step boundary, and DDP must skip the all-reduce of every micro-batch but the last.
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision="fp16" if precision == "fp16" else "no",
                      gradient_accumulation_steps=cfg.train.grad_accum)
    _check_accumulation(acc, cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return acc, precision, autocast_dtype


def _check_accumulation(acc, cfg: SkilltuneConfig) -> None:
    """accelerate takes its accumulation count from the launcher (ACCELERATE_GRADIENT_ACCUMULATION_STEPS)
    and from a DeepSpeed config over ours: a different count would step the optimizer mid-step."""
    if acc.gradient_accumulation_steps != cfg.train.grad_accum:
        raise TrainingError(f"accelerate accumulates over {acc.gradient_accumulation_steps} micro-batches (from "
                            f"the launcher's config or ACCELERATE_GRADIENT_ACCUMULATION_STEPS) but train.grad_accum "
                            f"is {cfg.train.grad_accum}",
                            hint="make them equal: set gradient_accumulation_steps in the accelerate/DeepSpeed "
                                 "config to train.grad_accum, or remove it there")


def _shared_run_dir(acc, cfg, run_name, resume, run_dir) -> tuple[Path, bool]:
    """The main process picks (or creates) the run directory; every process gets the same answer."""
    obj = [None, None]
    if acc.is_main_process:
        run_path, resuming = _resolve_run_dir(cfg, run_name, resume, run_dir)
        _lock_run(run_path)
        obj = [str(run_path), resuming]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        obj = broadcast_object_list(obj)
    return Path(obj[0]), bool(obj[1])


_HELD: dict[str, object] = {}  # run directory -> its open lock file, held while train() runs


def _lock_run(run_path: Path) -> None:
    """One process trains a run directory at a time: a second `--resume` (two terminals, a scheduler's retry
    while the first still runs) would interleave checkpoints and metrics. A kill releases the lock."""
    lock = hold_exclusive(run_path)
    if lock is None:
        raise TrainingError(f"{run_path} is being trained by another process (pid {lock_holder(run_path)})",
                            hint="wait for it to finish or stop it, then --resume; or train into a new run directory")
    _HELD[str(run_path)] = lock


def _resume_point(ckpt_root: Path, resuming: bool, identity: dict, force: bool) -> Path | None:
    complete = ckpt.complete_checkpoints(ckpt_root) if resuming else []
    latest = complete[-1] if complete else None
    if latest is not None:
        saved = json.loads((latest / "identity.json").read_text())
        if "template" not in saved:
            saved["template"] = _saved_template(ckpt_root.parent, identity["template"])
        changed = ckpt.identity_diff(saved, identity)
        if changed and not force:
            raise TrainingError("cannot resume: the config, data or chat template changed since the checkpoint:\n  "
                                + "\n  ".join(changed[:20]),
                                hint="restore them (model.chat_template names a template), pass --force to "
                                     "resume anyway, or start a new run")
    return latest


def _setup_model(s: Session, autocast_dtype) -> None:
    """Load and wrap the model; install the CPU kernels and choose the shared-prefix layout."""
    cfg, method = s.cfg, s.method
    # Adapter methods keep the frozen base in the compute dtype (no per-step weight casts) and
    # the trainable weights in fp32; full finetuning keeps fp32 master weights under autocast.
    base_dtype = autocast_dtype if (method.is_adapter and autocast_dtype is not None) else torch.float32
    loaded = load_model(cfg.model, dtype=base_dtype, source=s.source, **method.load_kwargs(cfg.adapter))
    torch.manual_seed(cfg.train.seed)  # LoRA init is seeded: same config, same adapter
    model = method.wrap(loaded.model, cfg.adapter)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if cfg.train.kernels and s.acc.device.type == "cpu":
        s.kernels, s.undo_kernels = install_kernels(model)
    if cfg.train.neftune_noise_alpha is not None:
        s.undo_noise = _embedding_noise(model, cfg.train.neftune_noise_alpha)
    s.share_prefix, s.share_prefix_refusal = s.objective.layout(s, model)
    if s.acc.is_main_process:
        _check_disk(s.run_path, model, cfg)
    s.model = model
    s.trainable, s.total = trainable_summary(model)


def _embedding_noise(model, alpha: float):
    """NEFTune (transformers' hook on the input embeddings: noise in training mode only); returns its removal.

    The noise is drawn from torch's generator, whose state checkpoints keep: a resumed run draws what the
    uninterrupted one would have.
    """
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    handle = activate_neftune(model, alpha)
    return lambda: deactivate_neftune(model, handle)


def _setup_optimizer(s: Session, autocast_dtype) -> None:
    from transformers import get_scheduler

    cfg, acc = s.cfg, s.acc
    s.plan = StepPlan(len(s.data.train), cfg.train.batch_size, cfg.train.grad_accum, acc.num_processes,
                      cfg.train.seed)
    s.total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * s.plan.steps_per_epoch)
    s.eval_every = cfg.train.eval_steps or s.plan.steps_per_epoch
    s.params = [p for p in s.model.parameters() if p.requires_grad]
    # The fused AdamW kernel: one pass over all adapter tensors instead of ~10 ops per tensor (38 -> 10 ms a step here).
    optimizer = torch.optim.AdamW(_param_groups(s.model, cfg.train.lr, cfg.train.loraplus_lr_ratio),
                                  lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=acc.device.type in ("cpu", "cuda"))
    s.scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(cfg.train.scheduler, cfg.train.scheduler),
                                optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * s.total_steps),
                                num_training_steps=s.total_steps)
    s.loss_fn, s.optimizer = acc.prepare(s.objective.loss(s, autocast_dtype), optimizer)
    _check_accumulation(acc, cfg)  # DeepSpeed's config wins inside prepare


def _param_groups(model, lr: float, loraplus_ratio: float | None) -> list[dict]:
    """The optimizer's parameter groups: one at ``lr``; with LoRA+ the adapters' B matrices get their own, at
    ``lr`` x the ratio (the scheduler scales both alike)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not loraplus_ratio:
        return [{"params": [p for _, p in trainable]}]
    b = [p for name, p in trainable if ".lora_B." in name]
    if not b:
        raise TrainingError("train.loraplus_lr_ratio is set but the model has no LoRA B matrices",
                            hint="remove train.loraplus_lr_ratio, or train a LoRA/DoRA adapter")
    rest = [p for name, p in trainable if ".lora_B." not in name]
    return [{"params": rest, "lr": lr}, {"params": b, "lr": lr * loraplus_ratio}]


def _restore(s: Session) -> None:
    """This process's optimizer, scheduler and RNG state (the weights went in before ``prepare``)."""
    acc = s.acc
    s.loop = LoopState.from_json(ckpt.load_checkpoint(s.latest, s.optimizer, s.scheduler, acc.process_index,
                                                      acc.num_processes))
    if s.acc.is_main_process:  # forget what the interrupted run logged after its last checkpoint
        metrics_file = s.run_path / "metrics.jsonl"
        if metrics_file.is_file():
            kept = [ln for ln in metrics_file.read_text().splitlines() if json.loads(ln)["step"] <= s.loop.step]
            atomic_write_text(metrics_file, "".join(ln + "\n" for ln in kept))
    s.reporter.message(f"resuming from {s.latest.name} (step {s.loop.step} of {s.total_steps})")


def _write_run_record(s: Session) -> None:
    """``config.yaml`` and ``run.json`` (a new run only), and the plan shown before the first step."""
    cfg = s.cfg
    if not s.resuming:
        atomic_write_text(s.run_path / "config.yaml", dump_config(cfg))
        atomic_write_text(s.run_path / "run.json", json.dumps({
            "name": s.run_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "identity": s.identity,
            "base_model": {"spec": s.source.spec if s.source.kind == "registry" else cfg.model.base,
                           "kind": s.source.kind, "path": str(s.source.path),
                           "hash": s.base_hash},
            "tokenizer": s.tok_info.__dict__, "environment": environment(s.precision),
            "method": cfg.adapter.method, "objective": cfg.train.objective, "world_size": s.acc.num_processes,
            "kernels": s.kernels, "share_prefix": s.share_prefix, "provenance": _provenance(s)}, indent=2))
    tokens_per_epoch = sum(len(e.input_ids) for e in s.data.train)
    s.reporter.plan({
        "base model": f"{cfg.model.base} ({s.source.kind})", "method": cfg.adapter.method,
        "objective": f"{cfg.train.objective}" + (f" (beta {cfg.train.dpo_beta}; reference: the starting model)"
                                                 if cfg.train.objective == "dpo" else ""),
        "trainable": f"trainable params: {s.trainable:,} || all params: {s.total:,} || "
                     f"trainable%: {100 * s.trainable / s.total:.4f}",
        "precision": s.precision, "processes": s.acc.num_processes,
        "chat template": f"{s.tok_info.chat_template_source}; each answer ends with {s.tok_info.eos_token}"
                         + (f"; added to the vocabulary: {', '.join(s.tok_info.added_tokens)}"
                            if s.tok_info.added_tokens else ""),
        "examples": f"{len(s.data.train)} train / {len(s.data.val)} val",
        "tokens per epoch": f"{tokens_per_epoch:,}", "steps": f"{s.total_steps} ({s.plan.steps_per_epoch}/epoch)",
        "packing": cfg.train.packing,
        **({"embedding noise": f"NEFTune, alpha {cfg.train.neftune_noise_alpha} (training steps only)"}
           if cfg.train.neftune_noise_alpha is not None else {}),
        **({"learning rates": f"LoRA+: A matrices {cfg.train.lr:g}, B matrices "
                              f"{cfg.train.lr * cfg.train.loraplus_lr_ratio:g} (x{cfg.train.loraplus_lr_ratio:g})"}
           if cfg.train.loraplus_lr_ratio else {}),
        "shared prefix": s.share_prefix or (f"off ({s.share_prefix_refusal})" if s.share_prefix_refusal else "off"),
        "kernels": _kernel_plan(s),
        "run dir": str(s.run_path)})


def _provenance(s: Session) -> dict:
    """Where the training rows came from, as the rows say (a scorecard study and item for each exported pair)."""
    studies: dict[str, int] = {}
    for ex in s.data.train_examples + s.data.val_examples:
        if ex.meta.get("study"):
            studies[str(ex.meta["study"])] = studies.get(str(ex.meta["study"]), 0) + 1
    return {"studies": studies} if studies else {}


def _kernel_plan(s: Session) -> str:
    """Which CPU kernels run, and for those that do not, why (the stock transformers/peft path runs instead)."""
    if not s.cfg.train.kernels or s.acc.device.type != "cpu":
        return "stock (" + ("train.kernels is off" if not s.cfg.train.kernels else "CPU kernels; not on a GPU") + ")"
    ran = ", ".join(f"{k} x{n}" for k, n in s.kernels.items()) or "none"
    aside = "; ".join(f"{k}: {why}" for k, why in skipped_kernels(s.kernels).items())
    return ran + (f"; stepped aside: {aside}" if aside else "")


# ---------------------------------------------------------------- fit
def fit(s: Session, stop_after: int | None = None) -> None:
    """Steps until done (or stopped early); a Ctrl-C, SIGTERM or ``stop_after`` leaves a checkpoint to resume."""

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    loop, cfg = s.loop, s.cfg
    s.reporter.start(s.total_steps, loop.step)
    first = loop.step
    s.loss_fn.train()
    try:
        while loop.step < s.total_steps and not loop.stopped_early:
            metrics, dt = train_step(s)
            step = loop.step
            if step % s.eval_every == 0 or step == s.total_steps:
                validate(s, metrics)
            if s.trackers:
                s.trackers.log(step, metrics, force="val_loss" in metrics or step == s.total_steps)
            s.reporter.step(step, metrics)
            if step == first + 2 and s.total_steps > step:  # a short warm-up, then the estimate
                left = (s.total_steps - step) * dt
                s.reporter.message(f"estimated time left: {left / 60:.1f} min ({dt:.1f} s/step over "
                                   f"{s.total_steps - step} steps, validation not included)")
            if step % cfg.train.save_steps == 0 or step == s.total_steps or loop.stopped_early:
                _save(s, step)
            if stop_after is not None and step >= stop_after and step < s.total_steps:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        _interrupted(s)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    s.reporter.finish()
    s.undo_noise()
    s.undo_kernels()


def train_step(s: Session) -> tuple[dict, float]:
    """One optimizer step over this process's micro-batches; returns its metrics and wall time."""
    acc, cfg, loop, train = s.acc, s.cfg, s.loop, s.data.train
    step = loop.step
    t0 = time.perf_counter()
    # the step's loss is a mean over all its units (trained tokens; pairs), whichever process holds them
    step_units = sum(s.objective.units([train[i] for i in mb]) for mb in s.plan.micro_batches(step))
    mine = s.plan.micro_batches(step, acc.process_index)
    # accelerate syncs (and DeepSpeed steps) on its count of micro-batches reaching grad_accum;
    # start the count so that this step's last micro-batch is the boundary, a short last step too.
    acc.step = acc.gradient_accumulation_steps - len(mine)
    # DDP averages gradients over processes and accelerate divides by grad_accum: scale so the
    # step's gradient is the mean over all its units.
    scale = acc.num_processes * acc.gradient_accumulation_steps / step_units
    step_loss = 0.0
    seen = computed = 0
    for mb in mine:
        items = [train[i] for i in mb]
        seen += sum(len(e.input_ids) for e in items)
        batch = {k: v.to(acc.device) for k, v in s.objective.collate(s, items).items()}
        computed += sum(batch[k].numel() for k in ("input_ids", "prefix_ids") if k in batch)
        with acc.accumulate(s.loss_fn):
            loss = s.loss_fn(**batch)
            acc.backward(loss * scale)
        step_loss += float(loss.detach()) / step_units
    assert acc.sync_gradients, "the step's last micro-batch must be an accumulation boundary"
    if acc.num_processes > 1:
        step_loss = float(acc.reduce(torch.tensor(step_loss, device=acc.device), "sum"))
        seen = int(acc.reduce(torch.tensor(seen, device=acc.device), "sum"))
        computed = int(acc.reduce(torch.tensor(computed, device=acc.device), "sum"))
    norm = acc.clip_grad_norm_(s.params, cfg.train.max_grad_norm)  # FSDP/DeepSpeed-aware; unscales fp16
    grad_norm = float(norm) if norm is not None else float("nan")  # DeepSpeed clips inside its engine
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    loop.step = step + 1
    loop.tokens += seen
    loop.computed_tokens += computed
    loop.train_time_s += dt
    return {"train_loss": step_loss, "lr": s.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "tokens_per_s": seen / dt, "epoch": loop.step / s.plan.steps_per_epoch, **s.objective.step_metrics(s)}, dt


def validate(s: Session, metrics: dict) -> None:
    """Validation loss into ``metrics``; keep the best weights; count toward early stopping."""
    cfg, loop = s.cfg, s.loop
    found = s.objective.validate(s, s.data.val)
    if not found:
        return
    metrics.update(found)
    val = found["val_loss"]
    if loop.best_val is None or val < loop.best_val - 1e-6:
        loop.best_val, loop.best_step, loop.bad_evals = val, loop.step, 0
        state = _gathered_trainable(s)  # every process takes part (FSDP/DeepSpeed gather the shards)
        if s.acc.is_main_process:
            from safetensors.torch import save_file

            with atomic_dir(s.run_path / "best") as tmp:
                save_file(state, str(tmp / "trainable.safetensors"))
        return
    loop.bad_evals += 1
    patience = cfg.train.early_stopping_patience
    if patience and loop.bad_evals >= patience:
        loop.stopped_early = True
        s.reporter.message(f"early stopping at step {loop.step}: val loss has not improved for {patience} "
                           f"evaluations (best {loop.best_val:.4f} at step {loop.best_step})")


def _gathered_trainable(s: Session) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, by the model's parameter names.

    Through ``accelerator.get_state_dict`` (every process must call it): under FSDP or
    DeepSpeed ZeRO-3 each process holds only a shard, and reading the parameters on the
    main process alone would save a fraction of them. Single-process and DDP runs get the
    same tensors as reading the parameters directly.
    """
    wrapper = s.acc.unwrap_model(s.loss_fn)
    names = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    full = s.acc.get_state_dict(s.loss_fn)
    prefix = "model."  # CompletionLoss holds the model as .model
    return {k[len(prefix):]: v.detach().to("cpu").clone().contiguous() for k, v in (full or {}).items()
            if k in names}


def _save(s: Session, step: int) -> None:
    state = _gathered_trainable(s)
    per_process = _gathered_to_main(s.acc, ckpt.process_state(s.optimizer))
    if s.acc.is_main_process:
        ckpt.save_checkpoint(s.ckpt_root, step, state, per_process, s.scheduler, s.loop.to_json(), s.identity,
                             s.cfg.train.save_total_limit)
    s.acc.wait_for_everyone()


def _gathered_to_main(acc, obj) -> list | None:
    """Every process's ``obj``, in rank order, on the main process (None elsewhere).

    The optimizer state is per process: under FSDP and DeepSpeed ZeRO each process holds
    the moments of its own shard, so a checkpoint keeps one per process and resume gives
    each process its own back.
    """
    if acc.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * acc.num_processes if acc.is_main_process else None
    dist.gather_object(obj, out, dst=0)
    return out


def _interrupted(s: Session) -> None:
    """A checkpoint at the step reached (unless one is there), then a TrainingInterrupted that says how to resume."""
    saved = ckpt.complete_checkpoints(s.ckpt_root)
    if s.loop.step > 0 and (not saved or saved[-1].name != f"step-{s.loop.step:06d}"):
        _save(s, s.loop.step)
    if s.trackers:
        s.trackers.close()
    s.reporter.finish()
    raise TrainingInterrupted(f"training interrupted at step {s.loop.step} of {s.total_steps}; "
                              f"a checkpoint is saved in {s.ckpt_root}",
                              hint=f"continue with: skilltune train CONFIG --resume --run-dir {s.run_path}") from None


# ---------------------------------------------------------------- finish
def finish(s: Session) -> TrainResult:
    """The artifact (best validation weights when there was validation), summary and loss plot."""
    cfg, acc, loop, run_path = s.cfg, s.acc, s.loop, s.run_path
    best = run_path / "best"
    # The weights saved are the gathered ones (whole under FSDP/DeepSpeed too), never a shard.
    if loop.best_step is not None and (best / "trainable.safetensors").is_file():
        state = ckpt.load_trainable_file(best)
    else:
        state = _gathered_trainable(s)
    artifact = run_path / ("adapter" if s.method.is_adapter else "model")
    summary = {}
    if acc.is_main_process:
        with atomic_dir(artifact) as tmp:
            acc.unwrap_model(s.loss_fn).model.save_pretrained(tmp, state_dict=state)  # full: every weight is trainable
            s.tokenizer.save_pretrained(tmp)
            (tmp / ADAPTER_META).write_text(json.dumps({
                "method": cfg.adapter.method, "model": cfg.model.model_dump(mode="json"),
                "base_hash": s.base_hash, "tokenizer": s.tok_info.__dict__, "run": str(run_path.resolve()),
                "system_prompt": cfg.data.system_prompt}, indent=2))
        summary = _summary(s, artifact)
        atomic_write_text(run_path / "summary.json", json.dumps(summary, indent=2))
        plot_losses(run_path / "metrics.jsonl", run_path / "loss.png")
        s.trackers.close()
    acc.wait_for_everyone()
    return TrainResult(run_path, artifact, summary)


def _summary(s: Session, artifact: Path) -> dict:
    loop = s.loop
    last, at_best = {}, {}
    for line in (s.run_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        last.update(row)
        at_best = row if row["step"] == loop.best_step else at_best
    return {
        "run_dir": str(s.run_path), "artifact": str(artifact), "method": s.cfg.adapter.method,
        "objective": s.cfg.train.objective,
        # dpo: held-out reward accuracy and margin of the weights kept (the best validation; else the last)
        **{k: v for k, v in (at_best or last).items() if k.startswith("val_reward")},
        "steps": loop.step, "total_steps": s.total_steps, "stopped_early": loop.stopped_early,
        "final_train_loss": last.get("train_loss"), "final_val_loss": last.get("val_loss"),
        "best_val_loss": loop.best_val, "best_step": loop.best_step,
        "train_time_s": round(loop.train_time_s, 2), "tokens": loop.tokens,
        "tokens_per_s": round(loop.tokens / max(loop.train_time_s, 1e-9), 1),
        # positions the model ran: padding adds to them, shared prefixes take away
        "computed_tokens": loop.computed_tokens, "kernels": s.kernels,
        "trainable_params": s.trainable, "total_params": s.total, "precision": s.precision,
        "world_size": s.acc.num_processes,
    }
