"""dpm.core imports only torch and the standard library (it is what practitioners vendor)."""

import json
import subprocess
import sys

FORBIDDEN = ("hydra", "omegaconf", "torch_pruning", "torchvision", "thop", "wandb", "pandas",
             "sklearn", "tqdm")


def loaded_modules(stmt: str) -> set[str]:
    code = f"import sys, json\n{stmt}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_dpm_core_imports_only_torch():
    # Compare with torch alone: torch itself may load helpers (e.g. tqdm) that are not ours.
    torch_only = loaded_modules("import torch")
    modules = loaded_modules("import dpm.core")
    added = modules - torch_only
    bad = sorted(m for m in added if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"dpm.core pulled in {bad}"
    outside = sorted(m for m in added if m.startswith("dpm.") and not m.startswith("dpm.core"))
    assert not outside, f"dpm.core imports other dpm modules: {outside}"
    assert "torch" in modules and "dpm.core.controller" in modules


def test_core_sources_import_nothing_else():
    """Static check as well: every import in dpm/core is torch, stdlib or dpm.core itself."""
    import ast
    import pathlib

    import dpm.core

    root = pathlib.Path(dpm.core.__file__).parent
    allowed_roots = set(sys.stdlib_module_names) | {"torch", "__future__"}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    continue  # relative: inside dpm.core
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed_roots, f"{path.name} imports {name}"
