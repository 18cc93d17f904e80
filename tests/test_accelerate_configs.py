"""The accelerate config files shipped in examples/accelerate load with accelerate's own loader."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples/accelerate").glob("*.yaml"))


def test_there_are_fsdp_deepspeed_and_multi_node_configs():
    assert {p.stem for p in CONFIGS} >= {"fsdp", "deepspeed_zero2", "multi_node_ddp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))  # rejects unknown keys
    assert cfg.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MULTI_GPU)
    assert cfg.num_processes >= 2 and not cfg.use_cpu
    text = path.read_text()
    assert "-m skilltune.cli.main train CONFIG" in text.replace("\\\n", "")  # the launch command it documents
    if cfg.distributed_type == DistributedType.FSDP:
        assert cfg.fsdp_config["fsdp_version"] == 2
        from transformers.models.llama import modeling_llama  # the class named for the embedded SmolLM2

        assert hasattr(modeling_llama, cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        assert cfg.deepspeed_config["zero_stage"] == 2


def test_unknown_key_is_refused(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIGS[0].read_text() + "num_gpus_typo: 8\n")
    with pytest.raises((TypeError, ValueError)):
        load_config_from_file(str(bad))
