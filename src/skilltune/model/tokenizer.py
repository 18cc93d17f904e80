"""Tokenizer preparation, done once for training, evaluation and serving alike.

- a pad token that is *not* the EOS token (a pad==eos collator masks the EOS out of
  the labels and the model never learns to stop);
- a chat template: the config's (Jinja, or a built-in by name: ``plain``, ``chatml``, ``family``), else
  the model's own, else its family's, else ChatML; recorded so the same one is used at inference;
- the template's turn-end token, which every trained assistant turn must end with.
"""

from __future__ import annotations

from dataclasses import dataclass

from skilltune.errors import ModelLoadError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _resource(name: str) -> str:
    from importlib import resources

    return resources.files("skilltune.resources.chat_templates").joinpath(name).read_text("utf-8")


def _family_template(family) -> str:
    if family is None:
        raise ModelLoadError("model.chat_template: family: this model belongs to no known family",
                             hint="see `skilltune models families`; or use plain, chatml or a Jinja template")
    return family.template_text()


# Templates a config names instead of writing Jinja (``model.chat_template: plain``); the one list of names.
BUILTIN_TEMPLATES = {
    "plain": lambda family: _resource("plain.jinja"),  # base models: no control tokens (resources/.../plain.jinja)
    "chatml": lambda family: CHATML_TEMPLATE,
    "family": _family_template,  # the family's published instruct format (skilltune models families)
}


def template_problem(value: str | None) -> str | None:
    """What is wrong with a ``model.chat_template`` value: a name must be a built-in (Jinja has ``{``)."""
    if value is None or "{" in value or value in BUILTIN_TEMPLATES:
        return None
    return (f"unknown built-in template {value!r} (known: {', '.join(BUILTIN_TEMPLATES)}); "
            "or write the template itself (Jinja)")


# Tokens commonly present in vocabularies that are safe to pad with.
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")


@dataclass
class TokenizerInfo:
    """What was decided about the tokenizer; saved with every run and adapter."""

    chat_template_source: str  # model | family:NAME | chatml | config | builtin:NAME
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


def _builtin(name: str, tokenizer, family) -> str:
    """A built-in template, checked against what it needs from this tokenizer."""
    if name == "plain" and tokenizer.eos_token is None:
        raise ModelLoadError("model.chat_template: plain ends each answer with the end-of-sequence token, and this "
                             "tokenizer has none", hint="use chatml, or a Jinja template with its own end token")
    if name == "family" and family and (missing := [m for m in family.markers if m not in tokenizer.get_vocab()]):
        raise ModelLoadError(f"model.chat_template: family: the {family.name} template needs {', '.join(missing)}, "
                             "which this vocabulary lacks",
                             hint="use plain or chatml (chatml adds its two tokens, and says so)")
    return BUILTIN_TEMPLATES[name](family)


def _choose_template(tokenizer, chat_template: str | None, family) -> tuple[str, str]:
    """(template, where it came from): the config's (a built-in name or Jinja), the model's own, the family's
    when its markers are in the vocabulary, else ChatML."""
    if chat_template in BUILTIN_TEMPLATES:
        return _builtin(chat_template, tokenizer, family), f"builtin:{chat_template}"
    if chat_template:
        return chat_template, "config"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, "model"
    if family is not None and all(m in tokenizer.get_vocab() for m in family.markers):
        return family.template_text(), f"family:{family.name}"
    return CHATML_TEMPLATE, "chatml"


def prepare_tokenizer(tokenizer, chat_template: str | None = None, family=None) -> TokenizerInfo:
    """Make ``tokenizer`` ready for finetuning, in place, and describe what was done.

    ``chat_template`` (the config's) is Jinja or a built-in's name (:data:`BUILTIN_TEMPLATES`). Without it,
    a tokenizer without a template gets its ``family``'s published one when the family's marker tokens are
    in the vocabulary, else ChatML.
    Returns a :class:`TokenizerInfo`; if ``added_tokens`` is not empty the model's
    embeddings must be resized (:func:`skilltune.model.loading.load_model` does it).
    """
    template, source = _choose_template(tokenizer, chat_template, family)
    tokenizer.chat_template = template
    added: list[str] = []
    if template is CHATML_TEMPLATE:  # its markers are added to a vocabulary that lacks them (and said: a warning)
        added = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if added:
            tokenizer.add_special_tokens({"additional_special_tokens": added})

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
