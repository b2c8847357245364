"""The executor's KV policies, one class per entry of the registry (`infinisim.core.policies`);
`make_policy` builds one by name with the knobs it has."""

from __future__ import annotations

from infinisim.core.policies import POLICIES as REGISTRY
from infinisim.core.policies import policy
from infinisim.executor.policies.base import Policy
from infinisim.executor.policies.dense import Full, Resident
from infinisim.executor.policies.h2o import H2O
from infinisim.executor.policies.infinigen import InfiniGen, Oracle
from infinisim.executor.policies.int4 import Int4

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Resident, Full, InfiniGen, Oracle, H2O, Int4)}
if set(POLICIES) != set(REGISTRY):  # a policy in the registry without an executor class, or the reverse
    raise ImportError(f"executor policies {sorted(POLICIES)} differ from the registry {sorted(REGISTRY)}")

__all__ = ["H2O", "POLICIES", "Full", "InfiniGen", "Int4", "Oracle", "Policy", "Resident", "make_policy"]


def make_policy(name: str, **knobs: object) -> Policy:
    """The named policy with the knobs it has (others are for other policies of the run; None: the default)."""
    spec = policy(name)
    return POLICIES[name](**{k: v for k, v in spec.make_knobs(knobs).to_dict().items()})
