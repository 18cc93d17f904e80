"""Where the time of a default training step goes, and what the matmuls reach (bench/run.py step | matmul).

- step:   the real training loop (`skilltune train`, the SQL example, its defaults) for 5 steps;
          steps 3-5 under torch.profiler. Every aten op's own time is put in a category
          (frozen-weight matmuls, LoRA's rank-r matmuls, the vocabulary projection, attention,
          casts, elementwise, gathers, optimizer), with the FLOPs and the TFLOP/s the matmuls reached.
- matmul: the decoder's matmul shapes alone, at 1 and 2 threads, against a 2048^3 product: what
          this machine's AMX gives the model's shapes (each product on its own weight, as in a step).

The profiler adds some microseconds to every op, so small ops look a little costlier than they are.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples/sql/config.yaml"
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_"}
ATTENTION = {"aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data"}
CASTS = {"aten::copy_", "aten::_to_copy", "aten::clone"}
GATHERS = {"aten::index_select", "aten::cat", "aten::index", "aten::gather", "aten::scatter", "aten::scatter_",
           "aten::index_add_", "aten::index_copy_", "aten::stack", "aten::embedding"}
OPTIMIZER = {"aten::_fused_adamw_", "aten::_foreach_norm", "aten::_foreach_mul_", "aten::_foreach_add_"}
ELEMENTWISE = {"aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::div",
               "aten::div_", "aten::silu", "aten::silu_backward", "aten::rsqrt", "aten::rsqrt_", "aten::pow",
               "aten::neg", "aten::exp", "aten::where", "aten::sum", "aten::linalg_vector_norm",
               "aten::linalg_vecdot", "aten::square_", "aten::masked_fill", "aten::masked_fill_", "aten::fill_",
               "aten::zero_", "aten::logsumexp", "aten::max", "aten::amax"}


def _model_config() -> dict:
    from skilltune.model.sources import resolve_model

    return json.loads((resolve_model("embedded:smollm2-135m-instruct").path / "config.json").read_text())


def _mm_dims(shapes: list) -> tuple[int, int, int] | None:
    """(M, K, N) of mm([M,K],[K,N]) or addmm(_)([M,N],[M,K],[K,N])."""
    mats = [s for s in shapes if isinstance(s, list) and len(s) == 2]
    if len(mats) < 2:
        return None
    (m, k), (_, n) = mats[-2], mats[-1]
    return m, k, n


def _category(name: str, shapes: list, vocab: int) -> tuple[str, float]:
    """(category, FLOPs) of one aten op."""
    if name in MATMULS and (dims := _mm_dims(shapes)):
        flops = 2.0 * dims[0] * dims[1] * dims[2]
        if vocab in dims:
            return "matmul: vocabulary projection", flops
        if min(dims) <= 64:
            return "matmul: LoRA rank-r products", flops
        return "matmul: frozen linear weights", flops
    if name == "aten::bmm" and len(shapes) >= 2 and all(isinstance(x, list) and len(x) == 3 for x in shapes[:2]):
        (b, m, k), (_, _, n) = shapes[0], shapes[1]
        return "attention (bmm, softmax)", 2.0 * b * m * k * n
    for cat, names in (("attention (bmm, softmax)", ATTENTION), ("casts and copies", CASTS),
                       ("gathers, concatenations", GATHERS), ("optimizer, gradient clipping", OPTIMIZER),
                       ("elementwise, norms, reductions", ELEMENTWISE)):
        if name in names:
            return cat, 0.0
    if name.startswith("aten::"):
        return "other aten ops", 0.0
    return "autograd functions, Python, the loop (own time)", 0.0


def bench_step() -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from skilltune.config import load_config
    from skilltune.train.loop import train
    from skilltune.train.reporter import Reporter

    warmup, active = 2, 3
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                   schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1))
    marks: dict[int, float] = {}

    class StepMarks(Reporter):  # the loop calls step() once per optimizer step
        def step(self, step: int, metrics: dict) -> None:
            marks[step] = time.perf_counter()
            prof.step()

    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(CONFIG, [f"train.output_dir={d}", "data.val=null", "data.val_split=0", "train.report_to=[]",
                                   f"train.max_steps={warmup + active}", "train.save_steps=100000"])
        with prof:
            res = train(cfg, run_name="bench-step", reporter=StepMarks())
        positions = res.summary["computed_tokens"]
    vocab = _model_config()["vocab_size"]
    wall_ms = (marks[warmup + active] - marks[warmup]) * 1e3 / active
    per: dict[str, list[float]] = {}
    for ev in prof.key_averages(group_by_input_shape=True):
        cat, flops = _category(ev.key, ev.input_shapes, vocab)
        acc = per.setdefault(cat, [0.0, 0.0])
        acc[0] += ev.self_cpu_time_total / 1e3 / active  # ms per step
        acc[1] += flops * ev.count / active
    rows = []
    for cat, (ms, flops) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        rows.append({"category": cat, "ms_per_step": round(ms, 1), "share": f"{100 * ms / wall_ms:.1f}%",
                     "gflop_per_step": round(flops / 1e9, 1) if flops else "-",
                     "tflop_s": round(flops / (ms / 1e3) / 1e12, 2) if flops else "-"})
    rows.append({"category": f"step wall time (positions per step ~{positions // (warmup + active)}, "
                             f"{torch.get_num_threads()} threads)", "ms_per_step": round(wall_ms, 1), "share": "100%"})
    return rows


def _tflops(fn, pairs, flops: float) -> float:
    t0 = time.perf_counter()
    for a, b in pairs:
        fn(a, b)
    return flops * len(pairs) / (time.perf_counter() - t0) / 1e12


def bench_matmul(tokens: int = 576, layers: int = 30, reps: int = 5) -> list[dict]:
    """bf16 TFLOP/s of the decoder's products (tokens x in @ in x out), 1 vs 2 threads, interleaved."""
    import torch

    c = _model_config()
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    shapes = {f"q, o forward ({h}->{h})": (h, h, "fwd"), f"k, v forward ({h}->{kv})": (h, kv, "fwd"),
              f"gate, up forward ({h}->{inter})": (h, inter, "fwd"),
              f"down forward ({inter}->{h})": (inter, h, "fwd"),
              f"gate, up input grad ({inter}->{h})": (h, inter, "bwd"),
              f"down input grad ({h}->{inter})": (inter, h, "bwd")}
    threads = torch.get_num_threads()
    cases = {}
    for label, (n_in, n_out, kind) in shapes.items():
        weights = [torch.randn(n_out, n_in, dtype=torch.bfloat16) for _ in range(layers)]  # nn.Linear layout
        if kind == "fwd":  # y = x W^T
            pairs = [(torch.randn(tokens, n_in, dtype=torch.bfloat16), w) for w in weights]
            cases[label] = (lambda x, w: x @ w.t(), pairs, 2.0 * tokens * n_in * n_out)
        else:  # dx = dy W
            pairs = [(torch.randn(tokens, n_out, dtype=torch.bfloat16), w) for w in weights]
            cases[label] = (lambda d, w: d @ w, pairs, 2.0 * tokens * n_in * n_out)
    big = torch.randn(2048, 2048, dtype=torch.bfloat16)
    cases["2048 x 2048 x 2048 (the usual peak)"] = (lambda a, b: a @ b, [(big, big)] * 3, 2.0 * 2048**3)
    seen: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(reps):
            for n in sorted({1, threads}):
                torch.set_num_threads(n)
                for label, (fn, pairs, flops) in cases.items():
                    fn(*pairs[0])
                    seen.setdefault((label, n), []).append(_tflops(fn, pairs, flops))
    finally:
        torch.set_num_threads(threads)
    rows = []
    for label in cases:
        one, many = (statistics.median(seen[(label, n)]) for n in (1, threads))
        rows.append({"product": label if "2048" in label else f"{label}, {tokens} positions",
                     "tflop_s_1_thread": round(one, 2), f"tflop_s_{threads}_threads": round(many, 2),
                     "speedup": round(many / one, 2)})
    return rows
