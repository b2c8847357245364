"""infinisim: measure and plan KV-cache offloading for LLM inference (InfiniGen and baselines).

The installed package gathers the project's folders under one namespace, each layer importing
only those below it: core (errors, atomic files, the KV policy registry) -> traces, hwprofiles ->
executor (torch) -> sim -> analysis -> cli.
"""

import os

# The executor's CPU stands in for a device, which does not doze between kernels: GNU OpenMP's idle
# workers spin for about 200 ms (20M spins here; LLVM's OpenMP waits 200 ms by default) before they
# sleep, not ~3 ms, unless the user chose. Asleep, they woke slowly after each wait for an emulated
# link's copy: attention took 115-160 ms a step instead of 21 (benchmarks/link_interference.py). Read
# once, when torch loads OpenMP: import infinisim before torch.
os.environ.setdefault("GOMP_SPINCOUNT", "20000000")

__version__ = "0.1.0"
