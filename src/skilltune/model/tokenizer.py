"""Tokenizer preparation, done once for training, evaluation and serving alike.

- a pad token that is *not* the EOS token (a pad==eos collator masks the EOS out of
  the labels and the model never learns to stop);
- a chat template: the model's own, else ChatML, recorded so the same one is used
  at inference;
- the template's turn-end token, which every trained assistant turn must end with.
"""

from __future__ import annotations

from dataclasses import dataclass

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Tokens commonly present in vocabularies that are safe to pad with.
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")


@dataclass
class TokenizerInfo:
    """What was decided about the tokenizer; saved with every run and adapter."""

    chat_template_source: str  # model | chatml | config
    pad_token: str
    pad_token_id: int
    eos_token: str
    eos_token_id: int
    added_tokens: list[str]


def _turn_end_token(tokenizer) -> str:
    """The token that closes an assistant turn in the template (e.g. ``<|im_end|>``)."""
    probe = "\x00probe\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
    )
    tail = text.split(probe, 1)[1]
    # special tokens, and added control tokens a converted tokenizer may not list as special (Gemma's <end_of_turn>)
    candidates = set(tokenizer.all_special_tokens) | {t for t in tokenizer.get_added_vocab() if len(t) > 2
                                                      and t[0] in "<[" and t[-1] in ">]"}
    for token in sorted(candidates, key=len, reverse=True):
        if tail.lstrip(" ").startswith(token):
            return token
    return tokenizer.eos_token


def prepare_tokenizer(tokenizer, chat_template: str | None = None, family=None) -> TokenizerInfo:
    """Make ``tokenizer`` ready for finetuning, in place, and describe what was done.

    A tokenizer without a template gets its ``family``'s published one (a base model such
    as Gemma 3 270M) when the family's marker tokens are in the vocabulary, else ChatML.
    Returns a :class:`TokenizerInfo`; if ``added_tokens`` is not empty the model's
    embeddings must be resized (:func:`skilltune.model.loading.load_model` does it).
    """
    added: list[str] = []
    vocab = tokenizer.get_vocab()
    if chat_template:
        tokenizer.chat_template, source = chat_template, "config"
    elif getattr(tokenizer, "chat_template", None):
        source = "model"
    elif family is not None and all(m in vocab for m in family.markers):
        tokenizer.chat_template, source = family.template_text(), f"family:{family.name}"
    else:
        tokenizer.chat_template, source = CHATML_TEMPLATE, "chatml"
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
            added += missing

    end = _turn_end_token(tokenizer)
    if tokenizer.eos_token is None or (source != "model" and tokenizer.eos_token != end):
        # Generation must stop where the template closes a turn.
        tokenizer.eos_token = end

    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        choice = next((t for t in _PAD_CANDIDATES if t in vocab and t not in (tokenizer.eos_token, end)), None)
        if choice is None:
            choice = "<|pad|>"
            tokenizer.add_special_tokens({"pad_token": choice})
            added.append(choice)
        else:
            tokenizer.pad_token = choice
    tokenizer.padding_side = "right"  # training; generation switches to left (see padding_for_generation)
    return TokenizerInfo(
        chat_template_source=source,
        pad_token=tokenizer.pad_token,
        pad_token_id=tokenizer.pad_token_id,
        eos_token=tokenizer.eos_token,
        eos_token_id=tokenizer.eos_token_id,
        added_tokens=added,
    )


def turn_end_token(tokenizer) -> str:
    return _turn_end_token(tokenizer)


def with_default_system(template: str, system: str) -> str:
    """``template`` that puts ``system`` first when a conversation has no system message of its own.

    An exported model is used by tools that know nothing of skilltune (vLLM, TGI, plain
    transformers); a model trained with a system prompt answers out of skill without it,
    so the export's chat template supplies the training system prompt by default.
    """
    import json

    literal = json.dumps(system)  # a valid Jinja string literal (backslash escapes, \\uXXXX)
    return ("{%- if messages and messages[0]['role'] != 'system' -%}"
            "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages -%}"
            "{%- endif -%}" + template)


def render_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """One user message (after an optional system prompt), rendered for generation with the model's template.

    The single place that turns a question into model input outside training data: eval's
    forgetting suite, replay, `skilltune generate` and the server all ask this way.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
