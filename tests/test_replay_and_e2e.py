"""`data replay` on the tiny model, and one real end-to-end training run of the embedded SmolLM2."""

import json

import pytest
from helpers import cli, write_yaml

from skilltune.data.reader import read_file
from skilltune.data.replay_prompts import general_prompts


def test_bundled_general_prompts():
    prompts = general_prompts()
    # the README's `data replay general.jsonl --n 200` (the default) needs 200, with room to spare
    assert 250 <= len(prompts) <= 300 and len(set(prompts)) == len(prompts)


def test_replay_with_tiny_model(tmp_path, stopping_run_dir, tiny_model_dir):
    out = tmp_path / "general.jsonl"
    code, text = cli("data", "replay", str(out), "--model", str(stopping_run_dir), "--n", "12",
                     "--max-new-tokens", "8")
    assert code == 0, text
    rep = read_file(out)
    assert not rep.problems
    assert 1 <= len(rep.examples) <= 12
    assert all(ex.turns[0].content in general_prompts() for ex in rep.examples)
    # a model that never stops is refused rather than producing rambling data
    code, text = cli("data", "replay", str(tmp_path / "g2.jsonl"), "--model", str(tiny_model_dir), "--n", "4",
                     "--max-new-tokens", "4")
    assert code == 2 and "finished none" in text


@pytest.mark.slow
def test_embedded_smollm2_trains_end_to_end(tmp_path, monkeypatch):
    """A few LoRA steps on the real model: loss falls, plain peft loads the adapter and it generates."""
    from conftest import _SHARED_HOME

    from skilltune.config import load_config
    from skilltune.demo import find_example
    from skilltune.train.loop import train

    monkeypatch.setenv("SKILLTUNE_HOME", str(_SHARED_HOME))
    monkeypatch.setenv("SKILLTUNE_REGISTRY_URL", f"sqlite:///{tmp_path / 'reg.db'}")
    example = find_example("sql")
    rows = (example / "data" / "train.jsonl").read_text().splitlines()[:32]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    cfg_path = write_yaml(tmp_path / "c.yaml", {"data": {"train": str(tmp_path / "train.jsonl"), "val_split": 0},
                                               "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3,
                                                         "logging_steps": 1, "output_dir": str(tmp_path / "runs")}})
    res = train(load_config(cfg_path), run_name="smol")
    losses = [json.loads(x)["train_loss"] for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((res.run_dir / "run.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(meta["base_model"]["path"])
    model = PeftModel.from_pretrained(base, str(res.run_dir / "adapter"))
    tok = AutoTokenizer.from_pretrained(str(res.run_dir / "adapter"))
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "How many users are in Europe?"}],
                                      tokenize=False, add_generation_prompt=True), return_tensors="pt",
              add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_a_killed_replay_continues_where_it_stopped(tmp_path, stopping_run_dir, monkeypatch):
    """Answers are journalled as they are made: the same command after a kill generates only the rest, and the
    file is the one an uninterrupted run writes. Another model (or other limits) starts over."""
    from skilltune.data import replay as replay_mod

    args = dict(model=str(stopping_run_dir), n=12, max_new_tokens=8, batch_size=1)  # journalled every 4 prompts
    whole = replay_mod.replay(dst=tmp_path / "whole.jsonl", **args)
    real, asked = replay_mod.generate, []

    class Killed(BaseException):  # like a kill, not an error: nothing is caught or cleaned up on its way out
        pass

    def killed_after_two_chunks(model, tokenizer, prompts, **kw):
        if len(asked) == 2:
            raise Killed
        asked.append(len(prompts))
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(replay_mod, "generate", killed_after_two_chunks)
    dst = tmp_path / "general.jsonl"
    with pytest.raises(Killed):
        replay_mod.replay(dst=dst, **args)
    journal = tmp_path / ".general.jsonl.replay-journal"
    assert not dst.exists() and len(journal.read_text().splitlines()) == 1 + 8
    with open(journal, "a") as fh:
        fh.write('{"i": 11, "te')  # a kill mid-line
    monkeypatch.setattr(replay_mod, "generate", lambda model, tokenizer, prompts, **kw: (
        asked.append(len(prompts)), real(model, tokenizer, prompts, **kw))[1])
    code, out = cli("data", "replay", str(dst), "--model", str(stopping_run_dir), "--n", "12", "--max-new-tokens",
                    "8")
    assert code == 0 and "(8 answered by the interrupted run resumed)" in out, out
    assert asked == [4, 4, 4]  # only the four prompts left were generated again
    assert dst.read_text() == (tmp_path / "whole.jsonl").read_text() and not journal.exists()
    assert whole.resumed == 0
    # a journal made with other limits is not used
    asked.clear()
    monkeypatch.setattr(replay_mod, "generate", killed_after_two_chunks)
    with pytest.raises(Killed):
        replay_mod.replay(dst=dst, **args)
    monkeypatch.setattr(replay_mod, "generate", real)
    assert replay_mod.replay(dst=dst, **{**args, "max_new_tokens": 9}).resumed == 0
