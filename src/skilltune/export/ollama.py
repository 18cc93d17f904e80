"""An Ollama ``Modelfile`` whose TEMPLATE, stop and SYSTEM come from the training chat template.

The TEMPLATE is not written by hand per family: the model's own chat template is
rendered once with marker strings for the system prompt and the user's message, and the
text around the markers becomes the Go template's literal parts. So whatever the family
(ChatML, Llama 3 headers, Gemma turns folding the system prompt into the user's turn),
Ollama is given the same text training saw. Only Ollama's single-turn variables
(``.System``, ``.Prompt``, ``.Response``) are used; :func:`render` renders exactly that
subset, which the parity check compares token by token with training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from skilltune.export.gguf import ExportError

# plain words: templates may trim or escape what they are given (Llama 3 trims each message)
_SYS, _USER, _ANSWER = "SkilltuneSystemMarker7f3a", "SkilltuneUserMarker7f3a", "SkilltuneAnswerMarker7f3a"


@dataclass
class Modelfile:
    gguf_name: str
    template: str
    stops: list[str]
    system: str | None

    def text(self) -> str:
        lines = [f"FROM ./{self.gguf_name}", f'TEMPLATE """{self.template}"""']
        lines += [f"PARAMETER stop {json.dumps(s)}" for s in self.stops]
        lines += ["PARAMETER temperature 0"]
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        return "\n".join(lines) + "\n"


def _split(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise ExportError(f"the chat template does not place the {what} once in its output, so an Ollama TEMPLATE "
                          "cannot be derived from it", hint="export --format gguf and write the Modelfile by hand")
    before, after = text.split(marker)
    return before, after


def derive(tokenizer, gguf_name: str, system: str | None, stop_token: str, strip_bos: bool) -> Modelfile:
    """The Modelfile for ``tokenizer``'s chat template (already carrying the training system prompt).

    ``strip_bos``: the GGUF adds BOS itself (llama.cpp), so a BOS the template writes is left out.
    """
    def render(messages, gen: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    with_sys = render([{"role": "system", "content": _SYS}, {"role": "user", "content": _USER}], True)
    bare = render([{"role": "user", "content": _USER}], True)
    answered = render([{"role": "system", "content": _SYS}, {"role": "user", "content": _USER},
                       {"role": "assistant", "content": _ANSWER}], False)
    head, rest = _split(with_sys, _SYS, "system prompt")
    between, after_user = _split(rest, _USER, "user's message")
    bare_head, bare_after = _split(bare, _USER, "user's message")
    after_answer = _split(answered, _ANSWER, "answer")[1]
    if bare_after != after_user:
        raise ExportError("the chat template's generation prompt depends on the system prompt; an Ollama TEMPLATE "
                          "cannot express that", hint="export --format gguf and write the Modelfile by hand")
    bos = tokenizer.bos_token or ""
    if strip_bos and bos:
        head = head[len(bos):] if head.startswith(bos) else head
        bare_head = bare_head[len(bos):] if bare_head.startswith(bos) else bare_head
    end = after_answer[:after_answer.find(stop_token) + len(stop_token)] if stop_token in after_answer else stop_token
    template = (f"{{{{ if .System }}}}{_go(head)}{{{{ .System }}}}{_go(between)}{{{{ else }}}}{_go(bare_head)}"
                f"{{{{ end }}}}{{{{ .Prompt }}}}{_go(after_user)}{{{{ .Response }}}}{_go(end)}")
    return Modelfile(gguf_name, template, [stop_token], _go(system) if system else None)


def _go(text: str) -> str:
    """Literal text inside a Go template (``{{`` would open an action) and a triple-quoted Modelfile string."""
    if "{{" in text or '"""' in text:
        raise ExportError("the chat template or the system prompt contains '{{' or '\"\"\"', which a Modelfile "
                          "cannot hold literally", hint="export --format gguf and write the Modelfile by hand")
    return text


_ACTION = re.compile(r"\{\{\s*(if \.System|else|end|\.System|\.Prompt|\.Response)\s*\}\}")


def render(template: str, system: str | None, prompt: str) -> str:
    """Render the subset of Go templates :func:`derive` writes, as Ollama does to generate one answer.

    Ollama renders a template without ``.Messages`` up to ``{{ .Response }}`` and drops what
    follows it (the answer's end is for the model to write).
    """
    out: list[str] = []
    keep = [True]  # one entry per open ``if``; text is emitted while all are true
    pos = 0
    values = {".System": system or "", ".Prompt": prompt}
    for m in _ACTION.finditer(template):
        if all(keep):
            out.append(template[pos:m.start()])
        action = m.group(1)
        pos = m.end()
        if action == "if .System":
            keep.append(bool(system))
        elif action == "else":
            keep[-1] = not keep[-1]
        elif action == "end":
            keep.pop()
        elif action == ".Response":
            return "".join(out)
        elif all(keep):
            out.append(values[action])
    out.append(template[pos:])
    return "".join(out)


def parse(text: str) -> Modelfile:
    """Read back what :meth:`Modelfile.text` wrote (the parity check reads the file, not our memory)."""
    gguf = re.search(r"^FROM \./(.+)$", text, re.M)
    template = re.search(r'^TEMPLATE """(.*?)"""', text, re.M | re.S)
    system = re.search(r'^SYSTEM """(.*?)"""', text, re.M | re.S)
    stops = [json.loads(m.group(1)) for m in re.finditer(r"^PARAMETER stop (.+)$", text, re.M)]
    if not gguf or not template:
        raise ExportError("the Modelfile has no FROM or TEMPLATE line")
    return Modelfile(gguf.group(1), template.group(1), stops, system.group(1) if system else None)
