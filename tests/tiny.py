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
