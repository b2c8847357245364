"""infinisim: measure and plan KV-cache offloading for LLM inference (InfiniGen and baselines).

The installed package gathers the project's folders under one namespace, each layer importing
only those below it: core (errors, atomic files, the KV policy registry) -> traces, hwprofiles ->
executor (torch) -> sim -> analysis -> cli.
"""

__version__ = "0.1.0"
