"""infinisim: measure and plan KV-cache offloading for LLM inference (InfiniGen and baselines)."""

__version__ = "0.1.0"
