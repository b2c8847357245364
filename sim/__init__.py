"""Discrete-event (SimPy) model of GPU compute, PCIe links and CPU memory that replays traces.

Torch-free by design. The model itself arrives with the simulator issue.
"""
