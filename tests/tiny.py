"""Tiny models for tests: a Llama-architecture model (2 layers, hidden 64) built from a
config, with a byte-level BPE tokenizer trained locally. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "SELECT name FROM users WHERE region = 'EU' ORDER BY name LIMIT 5;",
    "SELECT COUNT(*) FROM orders GROUP BY product_id;",
    "How many users signed up last month? List the top products by revenue.",
    "The quick brown fox jumps over the lazy dog. 0123456789 {\"key\": \"value\", \"n\": 42}",
    "You are a helpful assistant. Please answer politely and concisely.",
    "system user assistant hello world what is the answer to the question",
]


def build_tokenizer(out: Path, chat_template: str | None = CHATML, pad: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>" if pad else None,
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    return fast


def build_tiny_model(out: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    """Write a tiny random Llama model + tokenizer to ``out`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


# ---------------------------------------------------------------- one tiny model per family (the compatibility matrix)
FAMILY_TOKENS = {  # family -> (bos, eos, the template's marker tokens); real names, so the real templates apply
    "llama": ("<|begin_of_text|>", "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "smollm2": ("<|im_start|>", "<|im_end|>", []),
    "mistral": ("<s>", "</s>", ["[INST]", "[/INST]"]),
    "qwen2": ("<|endoftext|>", "<|endoftext|>", ["<|im_start|>", "<|im_end|>"]),
    "qwen3": ("<|endoftext|>", "<|endoftext|>", ["<|im_start|>", "<|im_end|>"]),
    "gemma2": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma3": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}


def _family_config(family: str, vocab: int, bos: int, eos: int):
    """The family's real structure at toy size: biases, q/k norms, soft-capping, sliding windows, fused projections."""
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=bos,
                  eos_token_id=eos, pad_token_id=None)
    if family in ("llama", "smollm2"):
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)  # q/k/v with biases
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16)  # q/k RMSNorm
    if family == "gemma2":
        return Gemma2Config(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":
        return Phi3Config(**common)  # fused qkv_proj and gate_up_proj
    raise ValueError(family)


def build_family_model(out: Path, family: str, seed: int = 0, sliding_window: int | None = None) -> Path:
    """A tiny random model of ``family`` with a tokenizer that has the family's special tokens (no template);
    ``sliding_window`` replaces the family config's window (Gemma 2/3: 8 tokens)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bos, eos, markers = FAMILY_TOKENS[family]
    specials = list(dict.fromkeys(["<unk>", bos, eos, *markers]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   additional_special_tokens=markers)
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = _family_config(family, len(fast), fast.convert_tokens_to_ids(bos), fast.convert_tokens_to_ids(eos))
    if sliding_window is not None:
        config.sliding_window = sliding_window
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out
