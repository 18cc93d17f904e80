"""The estimator: trainable counts equal peft's on meta-device models, memory figures in a sane range."""

import pytest
import torch

from skilltune.readiness.estimate import count_params, estimate, load_card, lora_trainable


def _meta_model(cfg: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _peft_trainable(model, r: int, dora: bool = False) -> int:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                  use_dora=dora, task_type="CAUSAL_LM"))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 400, "tie_word_embeddings": True}


@pytest.mark.parametrize("name", ["tiny", "llama-3.1-8b", "qwen2.5-7b", "mistral-7b", "gemma-2-2b", "phi-3-mini",
                                  "smollm2-135m"])
def test_trainable_and_total_match_peft_and_transformers(name):
    cfg = TINY if name == "tiny" else load_card(name)[1]
    model = _meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert count_params(cfg)["total"] == total
    assert lora_trainable(cfg, 16) == _peft_trainable(model, 16)


def test_dora_adds_magnitude_vectors():
    model = _meta_model(TINY)
    assert lora_trainable(TINY, 8, dora=True) == _peft_trainable(model, 8, dora=True)


def test_published_shapes_and_memory_ranges():
    assert count_params(load_card("llama-3.1-8b")[1])["total"] == 8_030_261_248
    lora = estimate("mistral-7b", "lora", "a100-80gb", batch=1, seq=512)
    qlora = estimate("mistral-7b", "qlora", "a100-80gb", batch=1, seq=512)
    gib = 1024**3
    # LLaMA-Factory's table for a 7B model: LoRA 16-bit ~16 GB, QLoRA 4-bit ~6 GB
    assert 13 * gib < sum(lora.memory_gc.values()) < 20 * gib
    assert 4 * gib < sum(qlora.memory_gc.values()) < 9 * gib
    full = estimate("llama-3.1-8b", "full", "a100-80gb")
    assert sum(full.memory.values()) > 80 * gib  # 16 bytes/param does not fit one A100
    e = estimate("llama-3.1-8b", "qlora", "a100-80gb", 1000, 400, 3, price_per_hour=2.5)
    assert e.cost == pytest.approx(e.hours * 2.5) and e.hours > 0


def test_unknown_card_lists_the_known_ones(tmp_path):
    from skilltune.errors import SkilltuneError

    with pytest.raises(SkilltuneError) as err:
        load_card("gpt-9")
    assert "llama-3.1-8b" in err.value.hint
    import json

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert load_card(str(tmp_path))[1]["hidden_size"] == 64
    # a multimodal config nests its decoder's sizes (Gemma 3 4B+, Llama 3.2 Vision): those are used
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": TINY}))
    assert load_card(str(tmp_path))[1]["hidden_size"] == 64
    # a config without the sizes, or not JSON: a message, not a KeyError
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": "x", "vocab_size": 10}))
    with pytest.raises(SkilltuneError, match="hidden_size, intermediate_size, num_hidden_layers, num_attention_heads "
                                             "missing or not a positive whole number"):
        load_card(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(SkilltuneError, match="not a readable config.json"):
        load_card(str(tmp_path))


def test_estimate_cli():
    from helpers import cli

    code, out = cli("estimate", "--model", "llama-3.1-8b", "--method", "qlora", "--gpu", "a100-80gb",
                    "--examples", "1000", "--avg-tokens", "400", "--epochs", "3", "--price-per-hour", "2.5")
    assert code == 0 and "trainable 41,943,040" in out and "cost" in out and "gradient checkpointing" in out
