"""Tandem: disaggregated LLM inference serving.

A request flows frontend -> router -> (prefill worker -> KV transfer ->) decode worker -> stream back.
Every worker runs one `EngineCore` (engine/), which drives one scheduler and one KV-cache manager
(kvcache/) with either the built-in PyTorch executor or the simulated one (engines/).
"""

__version__ = "0.1.0"
