"""`skilltune estimate`: parameters, adapter size, GPU memory, time and cost before spending a cent.

Works from small architecture cards (shapes only, no weights) shipped for popular open
models, or any local ``config.json``. Trainable-parameter counts follow peft exactly
(LoRA on every linear layer but the output head, as ``target_modules="all-linear"``);
memory and time are estimates with their assumptions printed next to them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from skilltune.errors import SkilltuneError

GIB = 1024**3

# peak dense bf16 (fp16 where noted) tensor TFLOP/s and memory in GiB
GPUS = {
    "a100-40gb": (312, 40), "a100-80gb": (312, 80), "h100-80gb": (989, 80), "h200": (989, 141),
    "l4": (121, 24), "a10g": (70, 24), "t4": (65, 16), "rtx-4090": (82.6, 24), "cpu-spr-2c": (2.0, 24),
}
DEFAULT_MFU = {"lora": 0.35, "dora": 0.25, "qlora": 0.25, "full": 0.4}


def load_card(model: str) -> tuple[str, dict]:
    """(name, config dict) from a shipped card name or a local config.json / model folder."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path.parent.name, _checked_config(path)
    cards = resources.files("skilltune.resources.cards")
    key = model.lower().removeprefix("meta-llama/").removeprefix("qwen/")
    f = cards.joinpath(f"{key}.json")
    if not f.is_file():
        names = sorted(p.name[:-5] for p in cards.iterdir() if p.name.endswith(".json"))
        raise SkilltuneError(f"no architecture card for '{model}'",
                             hint=f"use one of: {', '.join(names)}; or pass a local config.json")
    card = json.loads(f.read_text())
    return card["name"], card["config"]


_NEEDED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _checked_config(path: Path) -> dict:
    """A local config.json with the sizes the estimate needs (a multimodal model's ``text_config`` if nested)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise SkilltuneError(f"{path}: not a readable config.json ({exc})") from None
    if isinstance(cfg, dict) and "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    bad = [k for k in _NEEDED if not isinstance(cfg, dict) or not isinstance(cfg.get(k), int)
           or isinstance(cfg.get(k), bool) or cfg[k] < 1]
    if bad:
        raise SkilltuneError(f"{path}: {', '.join(bad)} missing or not a positive whole number",
                             hint="pass a decoder model's config.json (as on the Hugging Face Hub), or a card name")
    return cfg


def linear_shapes(cfg: dict) -> list[tuple[str, int, int]]:
    """(name, in, out) of each linear layer of one decoder layer."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    if cfg.get("model_type") == "phi3":  # fused projections
        return [("qkv_proj", h, (heads + 2 * kv) * hd), ("o_proj", heads * hd, h),
                ("gate_up_proj", h, 2 * inter), ("down_proj", inter, h)]
    return [("q_proj", h, heads * hd), ("k_proj", h, kv * hd), ("v_proj", h, kv * hd), ("o_proj", heads * hd, h),
            ("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)]


def count_params(cfg: dict) -> dict:
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    lin = sum(i * o for _, i, o in linear_shapes(cfg))
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    bias = (heads + 2 * kv) * hd if cfg.get("model_type") == "qwen2" or cfg.get("attention_bias") else 0
    norms = (4 if cfg.get("model_type") == "gemma2" else 2) * h
    per_layer = lin + bias + norms
    embed = vocab * h
    head = 0 if cfg.get("tie_word_embeddings", False) else vocab * h
    return {"total": embed + head + layers * per_layer + h, "linear": layers * lin, "embedding": embed, "head": head,
            "per_layer": per_layer}


def lora_trainable(cfg: dict, r: int, dora: bool = False) -> int:
    per_layer = sum(r * (i + o) + (o if dora else 0) for _, i, o in linear_shapes(cfg))
    return cfg["num_hidden_layers"] * per_layer


@dataclass
class Estimate:
    model: str
    method: str
    params: dict
    trainable: int
    adapter_bytes: int
    memory: dict  # name -> bytes
    memory_gc: dict
    flops: float
    hours: float
    cost: float | None
    gpu: str
    gpu_mem_gib: float
    assumptions: list[str]


def _activations(cfg: dict, batch: int, seq: int, gc: bool) -> float:
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    sb = batch * seq
    per_layer = sb * (12 * h + 2 * (heads + 2 * kv) * hd + 8 * inter)  # bf16 tensors kept for backward
    logits = sb * cfg["vocab_size"] * 10  # bf16 logits + fp32 upcast + fp32 gradient
    if gc:
        return layers * 2 * sb * h + per_layer + logits
    return layers * per_layer + logits


def estimate(model: str, method: str = "lora", gpu: str = "a100-80gb", examples: int = 1000, avg_tokens: int = 400,
             epochs: float = 3, r: int = 16, batch: int = 1, seq: int | None = None,
             price_per_hour: float | None = None, mfu: float | None = None) -> Estimate:
    if method not in DEFAULT_MFU:
        raise SkilltuneError(f"unknown method '{method}'", hint="lora, dora, qlora or full")
    if gpu not in GPUS:
        raise SkilltuneError(f"unknown GPU '{gpu}'", hint=f"one of: {', '.join(GPUS)}")
    name, cfg = load_card(model)
    p = count_params(cfg)
    seq = seq or avg_tokens
    adapter = method != "full"
    trainable = lora_trainable(cfg, r, dora=method == "dora") if adapter else p["total"]
    if method == "qlora":
        # NF4 linear weights (0.5 byte) + double-quantised constants (~0.127 bit/param); the rest bf16
        weights = p["linear"] * (0.5 + 0.127 / 8) + (p["total"] - p["linear"]) * 2
    else:
        weights = p["total"] * 2
    mem = {"weights": weights}
    if adapter:
        mem.update({"adapter (fp32)": trainable * 4, "gradients (fp32)": trainable * 4,
                    "optimizer (AdamW, 2 x fp32)": trainable * 8})
    else:
        mem.update({"fp32 master weights": trainable * 4, "gradients (bf16)": trainable * 2,
                    "optimizer (AdamW, 2 x fp32)": trainable * 8})
    mem_gc = dict(mem)
    mem["activations"] = _activations(cfg, batch, seq, gc=False)
    mem_gc["activations (gradient checkpointing)"] = _activations(cfg, batch, seq, gc=True)
    for d in (mem, mem_gc):
        d["CUDA context + allocator"] = 1.0 * GIB
    tokens = examples * avg_tokens * epochs
    compute_params = p["total"] - p["embedding"] + (p["embedding"] if cfg.get("tie_word_embeddings") else 0)
    flops = (4 if adapter else 6) * compute_params * tokens  # forward 2N + backward 2N (+2N weight grads if full)
    peak, gpu_mem = GPUS[gpu]
    util = mfu if mfu is not None else DEFAULT_MFU[method]
    hours = flops / (peak * 1e12 * util) / 3600
    assumptions = [
        f"{tokens:,.0f} training tokens = {examples:,} examples x {avg_tokens} tokens x {epochs:g} epochs",
        f"micro-batch {batch} x {seq} tokens; bf16 compute; LoRA r={r} on all linear layers but the output head",
        f"FLOPs = {'4' if adapter else '6'} x params x tokens (attention FLOPs and gradient-checkpointing recompute "
        "not included)",
        f"utilisation {util:.0%} of {peak} TFLOP/s peak bf16 on {gpu}",
        "activations: bf16 tensors kept per layer ~ s*b*(12h + 2*(heads+2*kv_heads)*head_dim + 8*intermediate) "
        "bytes, plus logits in bf16+fp32 with their gradient",
    ]
    return Estimate(name, method, p, trainable, trainable * 4, mem, mem_gc, flops, hours,
                    hours * price_per_hour if price_per_hour is not None else None, gpu, gpu_mem, assumptions)


def fmt_gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def summary_lines(e: Estimate) -> list[str]:
    total, total_gc = sum(e.memory.values()), sum(e.memory_gc.values())
    fits = "fits" if total <= e.gpu_mem_gib * GIB else (
        "fits only with gradient checkpointing" if total_gc <= e.gpu_mem_gib * GIB else "does NOT fit")
    out = [f"{e.model} / {e.method} on {e.gpu} ({e.gpu_mem_gib} GiB): {fits}",
           f"parameters {e.params['total']:,}; trainable {e.trainable:,} ({100 * e.trainable / e.params['total']:.3f}%)",
           f"adapter on disk ~{e.adapter_bytes / 1024**2:.1f} MiB" if e.method != "full" else
           f"model on disk ~{e.params['total'] * 2 / GIB:.1f} GiB (bf16)",
           f"memory {fmt_gib(total)} (with gradient checkpointing {fmt_gib(total_gc)})",
           f"training time ~{e.hours:.2f} h" + (f", cost ~${e.cost:.2f}" if e.cost is not None else "")]
    return out


def _ceil(x: float) -> int:
    return int(math.ceil(x))
