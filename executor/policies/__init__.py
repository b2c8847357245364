"""KV policies, one interface (executor/policies/base.py); `make_policy` builds one by name."""

from __future__ import annotations

import inspect

from infinisim.core.errors import InfinisimError
from infinisim.executor.policies.base import Policy
from infinisim.executor.policies.dense import Full, Resident
from infinisim.executor.policies.h2o import H2O
from infinisim.executor.policies.infinigen import InfiniGen, Oracle
from infinisim.executor.policies.int4 import Int4

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Resident, Full, InfiniGen, Oracle, H2O, Int4)}


def policy_knobs(name: str) -> set[str]:
    return set(inspect.signature(POLICIES[name].__init__).parameters) - {"self"}


def make_policy(name: str, **knobs: object) -> Policy:
    """The named policy with the knobs it accepts (others are for other policies of the run)."""
    if name not in POLICIES:
        raise InfinisimError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    accepted = policy_knobs(name)
    return POLICIES[name](**{k: v for k, v in knobs.items() if k in accepted and v is not None})
