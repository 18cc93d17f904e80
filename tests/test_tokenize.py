"""The completion-only label mask, exactly, on known examples."""

from skilltune.config.schema import ModelConfig
from skilltune.data.tokenize import IGNORE, encode_example
from skilltune.data.types import Example, Turn
from skilltune.model.loading import load_tokenizer
from skilltune.model.tokenizer import turn_end_token


def _tok(tiny_model_dir):
    return load_tokenizer(ModelConfig(base=str(tiny_model_dir)))[0]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_single_turn_labels_are_exactly_the_answer_and_eos(tiny_model_dir):
    tok = _tok(tiny_model_dir)
    ex = Example([Turn("user", "hello"), Turn("assistant", "world", train=True)])
    enc = encode_example(tok, ex, turn_end_token(tok))
    prompt = _ids(tok, "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    answer = _ids(tok, "world<|im_end|>")
    tail = _ids(tok, "\n")
    assert enc.input_ids == prompt + answer + tail
    assert enc.labels == [IGNORE] * len(prompt) + answer + [IGNORE] * len(tail)
    assert answer[-1] == tok.eos_token_id  # the model learns to stop


def test_multi_turn_trains_every_assistant_turn_and_respects_weight(tiny_model_dir):
    tok = _tok(tiny_model_dir)
    ex = Example([Turn("system", "be brief"), Turn("user", "a"), Turn("assistant", "b", train=False),
                  Turn("user", "c"), Turn("assistant", "d", train=True)])
    enc = encode_example(tok, ex, turn_end_token(tok))
    trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]
    assert trained == _ids(tok, "d<|im_end|>")
    text = tok.decode(enc.input_ids)
    assert text == tok.apply_chat_template(ex.messages(), tokenize=False)
    enc_all = encode_example(tok, Example([Turn("user", "a"), Turn("assistant", "b", True), Turn("user", "c"),
                                           Turn("assistant", "d", True)]), turn_end_token(tok))
    trained = [t for t, lab in zip(enc_all.input_ids, enc_all.labels) if lab != IGNORE]
    assert trained == _ids(tok, "b<|im_end|>") + _ids(tok, "d<|im_end|>")


def test_train_on_inputs_labels_everything_but_tails(tiny_model_dir):
    tok = _tok(tiny_model_dir)
    ex = Example([Turn("user", "hello"), Turn("assistant", "world", train=True)])
    enc = encode_example(tok, ex, turn_end_token(tok), train_on_inputs=True)
    assert enc.labels[: len(enc.labels) - 1] == enc.input_ids[: len(enc.labels) - 1]
