import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.engine.config import EngineConfig
from tandem.engines.builtin.executor import BuiltinExecutor
from tandem.engines.builtin.loader import load_config
from tandem.protocol.errors import CheckpointError


def _executor(path: Path) -> BuiltinExecutor:
    return BuiltinExecutor(path, EngineConfig(num_blocks=8), dtype="float32")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        _executor(tmp_path / "nope")


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        _executor(tmp_path)


def test_malformed_config(tmp_path: Path, tiny_llama: Path) -> None:
    d = _copy(tiny_llama, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        _executor(d)
    cfg = json.loads((tiny_llama / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lacks the field 'hidden_size'"):
        _executor(d)


def test_unsupported_architecture(tmp_path: Path, tiny_llama: Path) -> None:
    d = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        _executor(d)


def test_no_safetensors(tmp_path: Path, tiny_llama: Path) -> None:
    d = _copy(tiny_llama, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        _executor(d)


def test_missing_tensor(tmp_path: Path, tiny_llama: Path) -> None:
    d = _copy(tiny_llama, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape("'model.layers.1.mlp.up_proj.weight'")):
        _executor(d)


def test_sharded_checkpoint_loads_like_single_file(tmp_path: Path, checkpoint_factory) -> None:
    model = checkpoint_factory(tmp_path / "ref", "llama")
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = _executor(tmp_path / "ref").model, _executor(tmp_path / "sharded").model
    assert torch.equal(a.embed, b.embed)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.equal(x.qkv, y.qkv) and torch.equal(x.down, y.down)


def test_config_fields(tmp_path: Path, tiny_llama: Path) -> None:
    d = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    # transformers 4.x style: top-level rope_theta and rope_scaling, eos ids split over two files.
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    cfg["eos_token_id"] = [2, 3]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    mc = load_config(d)
    assert mc.rope_theta == 500000.0
    assert mc.rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}
    assert mc.eos_token_ids == (7, 2, 3)
    ex = _executor(d)
    assert (ex.max_model_len, ex.vocab_size, ex.eos_token_ids) == (256, 512, (7, 2, 3))


def test_unsupported_rope_type(tmp_path: Path, tiny_llama: Path) -> None:
    d = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope type 'yarn'"):
        _executor(d)
