"""The layering: each package imports only those below it (core -> traces, hwprofiles -> executor ->
sim -> analysis -> cli) at module level, and the simulator and the analysis never import torch at
module level (a planner installs them without it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = {"core": 0, "traces": 1, "hwprofiles": 1, "executor": 2, "sim": 3, "analysis": 4, "infinisim": 5}


def module_imports(package: str) -> dict[Path, set[str]]:
    """Per file of the package: the top-level modules its module-level statements import (not those
    inside functions, which load on use)."""
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        out[path] = names
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "infinisim":
        return parts[1] if len(parts) > 1 and parts[1] in ORDER else "infinisim"
    return None


def test_no_package_imports_one_above_it():
    upward = []
    for package, level in ORDER.items():
        for path, names in module_imports(package).items():
            for name in names:
                other = layer_of(name)
                if other and other != package and ORDER[other] >= level:
                    upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, upward


def test_sim_and_analysis_import_no_torch_at_module_level():
    heavy = [f"{path.relative_to(ROOT)}: {name}" for package in ("sim", "analysis", "traces", "core", "hwprofiles")
             for path, names in module_imports(package).items() for name in names
             if name.split(".")[0] == "torch" or layer_of(name) == "executor"]
    assert not heavy, heavy
