"""Discrete-event (SimPy) model of GPU compute, PCIe links and CPU memory that replays traces or
simulates described workloads. Torch-free by design.

workload (what runs: per step and layer, rows fetched and attended) -> policies (each KV policy's
behaviour, one class each) -> costs (how long each piece of work takes on a profile) -> memory
(what is allocated, whether it fits) -> engine (the host and its streams) -> run (the entry every
verb uses: simulate, or say why it does not fit).
"""
