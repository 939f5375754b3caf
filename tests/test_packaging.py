"""pyproject.toml and environment.yml describe the same environment; the package ships its configs."""

from __future__ import annotations

import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

from conftest import ROOT


def requirement_names(requirements):
    return {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_environment_yml_installs_this_project_with_the_pinned_torch():
    import torch
    import yaml

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert '-e ".[test]"' in pip  # every dependency comes from pyproject.toml
    pins = dict(p.split("==") for p in pip if "==" in p)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=]", d, maxsplit=1)[0]: d for d in project["dependencies"]}
    # the pinned torch/torchvision are the upper bounds pyproject allows (no newer torch is pulled)
    assert f"<={pins['torch']}" in deps["torch"] and f"<={pins['torchvision']}" in deps["torchvision"]
    assert torch.__version__.split("+")[0] == pins["torch"]
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    minimum = project["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, minimum.split(".")))


def test_declared_dependencies_are_installed():
    from importlib.metadata import PackageNotFoundError, version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    missing = []
    for name in requirement_names(project["dependencies"] + project["optional-dependencies"]["test"]):
        try:
            version(name)
        except PackageNotFoundError:
            missing.append(name)
    assert not missing
