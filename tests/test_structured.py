"""Structured output (`response_format`): answers decoded under a JSON grammar (model/structured.py).

The tiny models here have random or one-word weights: left alone they never write JSON, so every JSON answer
below is the grammar's doing.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

# at most 48 characters as JSON: the longest answer fits the 64-token budgets below even one token a character
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["region", "count", "active"],
          "properties": {"region": {"enum": ["EU", "NA", "APAC"]}, "count": {"type": "integer", "minimum": 0,
                                                                            "maximum": 999},
                         "active": {"type": "boolean"}}}


def _prompts(tok, questions):
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


@pytest.mark.parametrize("static", [False, True], ids=["running batch", "static batches"])
def test_generate_follows_a_json_schema_and_leaves_other_rows_alone(tiny_model_dir, monkeypatch, static):
    from skilltune.model import generate as gen
    from skilltune.model.structured import Grammar
    from skilltune.model.target import load_target

    if static:  # what a sliding-window model past its window goes through (transformers' generate)
        monkeypatch.setattr(gen, "decode_refusal", lambda model, longest=None: "forced for the test")
    target = load_target(str(tiny_model_dir))
    tok = target.tokenizer
    prompts = _prompts(tok, ["Which region?", "How many users?", "Anything."])
    outs = gen.generate(target.model, tok, prompts, max_new_tokens=64,
                        grammars=[Grammar.json(SCHEMA), None, Grammar.json(None)])
    answer = json.loads(outs[0].text)
    jsonschema.validate(answer, SCHEMA)
    assert outs[0].stopped and outs[0].text == json.dumps(answer)  # whole, and compact: no runaway whitespace
    if outs[2].stopped:  # any object: the random weights may not close it within the budget
        assert isinstance(json.loads(outs[2].text), dict)
    assert outs[2].text.startswith("{")
    alone = gen.generate(target.model, tok, prompts[1:2], max_new_tokens=64)[0]
    assert outs[1].text == alone.text  # a row without a grammar decodes as it does alone
    with pytest.raises(json.JSONDecodeError):
        json.loads(alone.text)  # the model itself does not write JSON


def test_bad_schemas_are_refused_before_any_decoding(tiny_model_dir):
    from skilltune.model.structured import MAX_SCHEMA_CHARS, Grammar, GrammarError
    from skilltune.model.target import load_target

    tok = load_target(str(tiny_model_dir)).tokenizer
    nested: dict = {"type": "string"}
    for _ in range(300):
        nested = {"type": "object", "properties": {"a": nested}, "required": ["a"]}
    for schema, needle in (({"type": "bogus"}, "Invalid type: bogus"), (nested, "recursion limit"),
                           ([1, 2], "must be a JSON object"),
                           ({"enum": ["x" * 100] * (MAX_SCHEMA_CHARS // 100)}, "at most 32,768")):
        with pytest.raises(GrammarError, match=needle):
            Grammar.json(schema).check(tok, tok.eos_token_id, len(tok))


@pytest.mark.parametrize("continuous", [True, False], ids=["running batch", "static batches"])
def test_the_server_answers_in_the_schema_it_is_asked_for(server, continuous):
    """OpenAI's response_format through the OpenAI client: json_schema and json_object, streamed or not, on chat
    and completions; a plain request in the same batch answers as it does alone."""
    from openai import OpenAI

    base, state, _ = server(continuous_batching=continuous, precision="fp32")  # bf16 moves with the batch shape
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    ask = {"model": "svc", "messages": [{"role": "user", "content": "Which region?"}], "max_tokens": 64}
    fmt = {"type": "json_schema", "json_schema": {"name": "region", "schema": SCHEMA, "strict": True}}
    plain = client.chat.completions.create(**ask).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        shaped, *others = pool.map(lambda f: client.chat.completions.create(**ask, **f),
                                   [{"response_format": fmt}, {}, {}, {"response_format": {"type": "text"}}])
    jsonschema.validate(json.loads(shaped.choices[0].message.content), SCHEMA)
    assert shaped.choices[0].finish_reason == "stop"
    assert [o.choices[0].message.content for o in others] == [plain] * 3
    chunks = list(client.chat.completions.create(**ask, response_format=fmt, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == shaped.choices[0].message.content
    anything = client.chat.completions.create(**ask, response_format={"type": "json_object"}).choices[0]
    assert anything.message.content.startswith('{"')  # any object: the random weights may not close it in 64
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.message.content), dict)
    done = client.completions.create(model="svc", prompt="SELECT", max_tokens=64, extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(done.choices[0].text), SCHEMA)


@pytest.mark.parametrize("response_format, status, needle", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}, 400, "Invalid type"),
    ({"type": "json_schema"}, 400, "needs json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, 422, "schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, 422, "schema"),
    ({"type": "xml"}, 422, "type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["y" * 64] * 600}}}, 400, "at most"),
])
def test_a_bad_response_format_is_a_4xx_naming_it(server, response_format, status, needle):
    base, state, _ = server()
    body = {"model": "svc", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
            "response_format": response_format}
    r = httpx.post(f"{base}/v1/chat/completions", json=body)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"].startswith("response_format"), r.text


def test_generate_command_takes_a_schema_file(tiny_model_dir, tmp_path):
    from helpers import cli

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    code, out = cli("generate", str(tiny_model_dir), "Which region?", "How many?", "--json-schema", str(schema),
                    "--max-new-tokens", "64", "--precision", "fp32")
    answers = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("base: ")]
    assert code == 0 and len(answers) == 2, out
    for answer in answers:
        jsonschema.validate(json.loads(answer), SCHEMA)
    schema.write_text('{"type": "bogus"}')
    code, out = cli("generate", str(tiny_model_dir), "x", "--json-schema", str(schema))
    assert code == 2 and "Invalid type: bogus" in out
    code, out = cli("generate", str(tiny_model_dir), "x", "--json-schema", str(tmp_path / "none.json"))
    assert code == 2 and "not a readable JSON file" in out


def test_eval_decodes_as_the_config_asks_and_reports_it(tmp_path, stopping_run_dir):
    """eval.response_format json_schema: base and finetuned answers (test, validation, latency) are decoded under
    eval.json_schema's grammar, as a server asked for that format answers; results.json says so."""
    from helpers import cli, write_jsonl, write_yaml

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"word": {"enum": ["hi", "yes", "no"]}},
                                  "required": ["word"], "additionalProperties": False}))
    rows = [{"prompt": f"Say {w}.", "completion": json.dumps({"word": w})} for w in ("hi", "yes", "no")]
    test, val = write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows)
    common = ["--test", str(test), "--no-forgetting", "--metrics", "json_schema", "--set",
              f"eval.json_schema={schema}", "--set", f"data.val={val}"]
    code, out = cli("eval", str(stopping_run_dir), *common, "--set", "eval.response_format=json_schema",
                    "--out", str(tmp_path / "shaped"))
    assert code == 0, out
    shaped = json.loads((tmp_path / "shaped" / "results.json").read_text())
    assert shaped["response_format"] == "json_schema"
    assert shaped["metrics"]["json_schema"]["tuned"] == shaped["metrics"]["json_schema"]["base"] == 1.0
    assert shaped["overfitting"]["val"] == 1.0, shaped["overfitting"]
    code, out = cli("eval", str(stopping_run_dir), *common, "--out", str(tmp_path / "plain"))
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert code == 0 and plain["metrics"]["json_schema"]["tuned"] == 0.0  # the one-word model never writes JSON
    code, out = cli("eval", str(stopping_run_dir), "--test", str(test), "--no-forgetting",
                    "--set", "eval.response_format=json_schema")
    assert code != 0 and "eval.json_schema" in out
    code, out = cli("config", "validate", str(write_yaml(tmp_path / "c.yaml", {
        "data": {"train": str(test)}, "eval": {"response_format": "xml"}})), "--no-data")
    assert code == 2 and "eval.response_format: 'xml' is not one of text, json_object, json_schema" in out


def test_the_openai_sdks_parse_with_a_pydantic_model(server):
    """`client.chat.completions.parse(response_format=Model)`: the SDK sends its strict schema ($defs, enums,
    additionalProperties false) and parses the answer into the model."""
    from typing import Literal

    from openai import OpenAI
    from pydantic import BaseModel, Field

    class Region(BaseModel):  # short names: the longest answer, {"r": {"c": "NA"}, "n": 9}, fits the budget
        c: Literal["EU", "NA"]

    class Answer(BaseModel):
        r: Region
        n: int = Field(ge=0, le=9)

    base, _, _ = server()
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    parse = getattr(getattr(client, "beta", client).chat.completions, "parse", None) or client.chat.completions.parse
    done = parse(model="svc", messages=[{"role": "user", "content": "Which region?"}], max_tokens=64,
                 response_format=Answer).choices[0]
    assert done.finish_reason == "stop" and isinstance(done.message.parsed, Answer), done
