"""Model families: each family's published chat template and end-of-turn token, as data.

The bugs users hit when they move a finetune between families are family-specific: the
wrong end-of-turn token is trained (the model never stops), or training and serving
render prompts differently. A base model that ships without a chat template gets its
family's published format (``resources/chat_templates/*.jinja``, each naming its
source) when the family's marker tokens are in its vocabulary; otherwise ChatML, and
any token that adds to the vocabulary is reported (``TokenizerInfo.added_tokens``).

Families register like everything else here (:func:`register_family`); ``skilltune
models families`` prints the table, with what each family supports and what was run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    template: str  # file in resources/chat_templates
    end_of_turn: str  # the token that closes an assistant turn (trained, and the stop token)
    markers: tuple[str, ...]  # tokens the template needs in the vocabulary
    notes: str = ""  # family-specific structure the contract tests cover
    real_weights: str = ""  # the real model this family has run on here, if any
    # the CPU training kernels that take over on this family's structure (train/kernels.py); the others step
    # aside. tests/test_families.py checks it against what installs on the family's tiny model.
    kernels: tuple[str, ...] = ("lora_linear", "rms_norm", "attention")
    # sliding-window layers: no shared prefix in training (the window would cut it), and generation's running
    # batch only while a prompt and its budget fit in the window (static batches otherwise); also checked
    sliding_window: bool = False

    def template_text(self) -> str:
        return resources.files("skilltune.resources.chat_templates").joinpath(self.template).read_text("utf-8")


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    FAMILIES[family.name] = family


def family_for(model_type: str | None) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def matrix() -> list[dict]:
    """One row per family for ``skilltune models families``: what is supported and what was run here."""
    from skilltune.train.kernels import KERNELS

    return [{"family": f.name, "model_types": list(f.model_types), "chat_template": f.template,
             "end_of_turn": f.end_of_turn, "structure": f.notes, "kernels": list(f.kernels),
             "kernels_step_aside": {k: kernel.steps_aside for k, kernel in KERNELS.items() if k not in f.kernels},
             "shared_prefix": "refused: sliding-window layers" if f.sliding_window else "yes",
             "running_batch": "while prompt + budget fit the window, else static batches" if f.sliding_window
             else "yes", "real_weights": f.real_weights or None} for f in FAMILIES.values()]


def family_of(model_dir: Path) -> Family | None:
    """The family of the HF model directory ``model_dir`` (from its config.json), if registered."""
    try:
        model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return family_for(model_type)


register_family(Family("llama", ("llama",), "llama3.jinja", "<|eot_id|>", ("<|start_header_id|>", "<|eot_id|>"),
                       "Llama 3.x: grouped-query attention, tied or untied embeddings"))
register_family(Family("smollm2", ("smollm2",), "chatml.jinja", "<|im_end|>", ("<|im_start|>", "<|im_end|>"),
                       "Llama-shaped (SmolLM2 reports model_type llama)",
                       real_weights="SmolLM2-135M-Instruct (embedded): the demo, and exports checked in llama.cpp"))
register_family(Family("mistral", ("mistral",), "mistral.jinja", "</s>", ("[INST]", "[/INST]"),
                       "sliding-window attention in its config (None in 7B v0.2+): shared prefixes refused when set"))
register_family(Family("qwen2", ("qwen2",), "chatml.jinja", "<|im_end|>", ("<|im_start|>", "<|im_end|>"),
                       "q/k/v projections with biases"))
register_family(Family("qwen3", ("qwen3",), "chatml.jinja", "<|im_end|>", ("<|im_start|>", "<|im_end|>"),
                       "RMSNorm on queries and keys"))
register_family(Family("gemma2", ("gemma2",), "gemma.jinja", "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"),
                       "logit and attention soft-capping, (1 + weight) RMSNorm, sliding-window layers, GeGLU",
                       kernels=("lora_linear",), sliding_window=True))
register_family(Family("gemma3", ("gemma3_text", "gemma3"), "gemma.jinja", "<end_of_turn>",
                       ("<start_of_turn>", "<end_of_turn>"),
                       "sliding-window layers, (1 + weight) RMSNorm with q/k norms, GeGLU, tied embeddings",
                       real_weights="Gemma 3 270M (embedded:gemma3-270m): the demo, and an Ollama export "
                                    "checked in llama.cpp", kernels=("lora_linear", "attention"), sliding_window=True))
register_family(Family("phi3", ("phi3",), "phi3.jinja", "<|end|>", ("<|user|>", "<|assistant|>", "<|end|>"),
                       "fused qkv_proj and gate_up_proj"))
