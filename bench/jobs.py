"""One training job of the side-by-side comparison (bench/run.py compare), in its own process.

    python bench/jobs.py JOB [STEPS]      JOB: skilltune | trl_default | trl_best

Same model (embedded SmolLM2-135M), data (the SQL example's train split, its system prompt),
LoRA (r=16, alpha=32, all linear layers, no dropout), global batch (8) and learning rate
(1e-3, cosine, 5% warm-up); one epoch unless STEPS is given; no validation during training.
Then the same held-out check for all three, with the adapter merged: the loss on the val split
and SQL execution accuracy on the test split (greedy). Prints one line ``RESULT {json}``:
dataset tokens trained, training seconds, positions computed (skilltune only), peak RSS during
training, the mean train loss of the last 10 steps, held-out loss and accuracy, and ``saved_at``
(``time.time()`` once the adapter is on disk: bench/run.py subtracts the moment it started the
process, giving the whole command's wall time — interpreter start, imports, model load, data,
training and the save — on the same clock for every job).

The training seconds are each tool's own clock: skilltune's summed optimizer-step time
(``train_time_s``: the steps only), TRL's ``trainer.train()`` wall time (its data loader, steps and
callbacks). The whole-command time is the one clock that treats both alike.

Environment: BENCH_SEED (default 42) seeds every job; BENCH_EVAL=0 skips the generation
(the held-out loss is still computed); BENCH_SET adds `--set` overrides to the skilltune job;
TRL_BEST / TRL_ATTN change the TRL "best" settings.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples/sql/config.yaml"
LR, BATCH, WARMUP = 1e-3, 8, 0.05
SEED = int(os.environ.get("BENCH_SEED", "42"))  # data order and LoRA initialisation, for every job


def _peak_rss_gb() -> float:
    """This process's peak resident memory. Linux's ``ru_maxrss`` survives exec: a job started by `make bench`
    after the generation benches reported their parent's 3.77 GB peak whatever it used itself. ``VmHWM`` is the
    high-water mark of this process image alone."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _heldout(model, tokenizer, cfg) -> tuple[float, float]:
    """The same check for every job, adapter merged, fp32: (mean completion-token loss on the val split,
    SQL execution accuracy on the test split, greedy; NaN with BENCH_EVAL=0).

    The loss is computed by the same code for all jobs, on examples none of them trained on, so it
    compares models, not logging: the jobs' last train losses come from different batches (each
    shuffles its own way) and TRL also counts the newline after the end-of-turn token, which
    skilltune does not train on.
    """
    from skilltune.data.reader import load_examples
    from skilltune.data.tokenize import prompt_text
    from skilltune.model.generate import generate
    from skilltune.evaluate.runner import heldout_loss as runner_loss
    from skilltune.evaluate.sql import sql_exec_score

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.float().eval()
    loss = runner_loss(model, tokenizer, load_examples(cfg.data.val, system_prompt=cfg.data.system_prompt))
    if os.environ.get("BENCH_EVAL", "1") == "0":
        return loss, float("nan")
    exs = load_examples(cfg.data.test, system_prompt=cfg.data.system_prompt)
    prompts = [prompt_text(tokenizer, e) for e in exs]
    refs = [e.turns[-1].content for e in exs]
    outs = generate(model, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                    batch_size=cfg.eval.batch_size)
    return loss, sum(sql_exec_score(o.text, r, cfg.eval.db) for o, r in zip(outs, refs)) / len(refs)


def run_skilltune(steps: int | None) -> dict:
    from skilltune.config import load_config
    from skilltune.model.target import load_target
    from skilltune.train.loop import train

    with tempfile.TemporaryDirectory() as d:
        sets = [f"train.output_dir={d}", "data.val=null", "data.val_split=0", "train.report_to=[]",
                "train.save_steps=100000"] + ([f"train.max_steps={steps}"] if steps else [])
        sets += [f"train.seed={SEED}"] + [x for x in os.environ.get("BENCH_SET", "").split() if x]  # + ablations
        cfg = load_config(CONFIG, sets)
        res = train(cfg, run_name="bench")  # saves the adapter
        saved_at = time.time()
        rss = _peak_rss_gb()
        s = res.summary
        losses = [json.loads(ln)["train_loss"] for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
        target = load_target(str(res.run_dir))
        heldout_loss, acc = _heldout(target.model, target.tokenizer, load_config(CONFIG))  # cfg has no val split
    return {"tokens": s["tokens"], "seconds": s["train_time_s"], "computed_tokens": s["computed_tokens"],
            "peak_rss_gb": rss, "final_loss": sum(losses[-10:]) / len(losses[-10:]), "heldout_loss": heldout_loss,
            "heldout_acc": acc, "saved_at": saved_at}


def trl_lora():
    """The LoRA every job trains (r=16, alpha=32, all linear layers, no dropout), as peft's config for TRL."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def loss_recorder(losses: list[float]):
    """A transformers callback appending each logged training loss to ``losses``."""
    from transformers import TrainerCallback

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Losses()


def run_trl(steps: int | None, best: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from skilltune.config import load_config
    from skilltune.model.loading import load_tokenizer
    from skilltune.model.sources import resolve_model

    cfg = load_config(CONFIG)
    path = str(resolve_model(cfg.model.base).path)
    rows = [json.loads(ln) for ln in open(cfg.data.train)]
    data = Dataset.from_list([
        {"prompt": [{"role": "system", "content": cfg.data.system_prompt}, {"role": "user", "content": r["prompt"]}],
         "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    tok = load_tokenizer(cfg.model)[0]  # pad != eos, as in skilltune (TRL would otherwise pad with eos)
    extra = {}
    model_kwargs = {}
    if best:  # the fastest CPU settings found for TRL here (bench/NOTES.md)
        # Measured (8 steps each): bf16=True alone changes nothing on a CPU (same losses as the default);
        # bf16 weights +10%; length-grouped batches +6%; eager attention +1%; padding_free -10%;
        # packing=True far slower (long packed rows). TRL_BEST / TRL_ATTN override, for trying more.
        extra = json.loads(os.environ.get("TRL_BEST", '{"bf16": true, "train_sampling_strategy": "group_by_length"}'))
        model_kwargs = {"dtype": torch.bfloat16, "attn_implementation": os.environ.get("TRL_ATTN", "eager")}
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    losses: list[float] = []

    with tempfile.TemporaryDirectory() as d:
        args = SFTConfig(output_dir=d, use_cpu=True, num_train_epochs=1, max_steps=steps or -1,
                         per_device_train_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="cosine",
                         warmup_steps=int(WARMUP * (steps or math.ceil(len(rows) / BATCH))), report_to=[], logging_steps=1, save_strategy="no", seed=SEED, **extra)
        tr = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=trl_lora(),
                        callbacks=[loss_recorder(losses)])
        t0 = time.perf_counter()
        tr.train()
        secs = time.perf_counter() - t0
        tr.save_model(str(Path(d) / "adapter"))  # what skilltune's run also ends with
        saved_at = time.time()
        rss = _peak_rss_gb()
        n_rows = min(len(tr.train_dataset), (steps or 10**9) * BATCH)
        tokens = sum(len(x) for x in tr.train_dataset.select(range(n_rows))["input_ids"])
        heldout_loss, acc = _heldout(tr.model, tok, cfg)
    return {"tokens": tokens, "seconds": secs, "peak_rss_gb": rss,
            "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1), "heldout_loss": heldout_loss,
            "heldout_acc": acc, "saved_at": saved_at}


JOBS = {"skilltune": lambda s: run_skilltune(s), "trl_default": lambda s: run_trl(s, best=False),
        "trl_best": lambda s: run_trl(s, best=True)}

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from skilltune.cli.common import quiet_libraries

    quiet_libraries()
    job, steps = sys.argv[1], (int(sys.argv[2]) if len(sys.argv) > 2 and int(sys.argv[2]) > 0 else None)
    print("RESULT " + json.dumps(JOBS[job](steps)), flush=True)
