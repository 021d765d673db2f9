"""environment.yml must declare the same requirements, with the same version bounds, as pyproject.toml."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name where they differ


def _split(requirement: str) -> tuple[str, str]:
    requirement = requirement.split(";")[0].strip()
    match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*)$", requirement)
    assert match, requirement
    return match.group(1).lower().replace("_", "-"), match.group(2).replace(" ", "")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    return dict(_split(r) for r in reqs)


def _environment_requirements() -> tuple[dict[str, str], dict[str, str], list[str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda, pip = {}, {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_lines = dep["pip"]
        else:
            name, spec = _split(dep)
            conda[name] = spec
    for line in pip_lines:
        if not line.startswith("-e"):
            name, spec = _split(line)
            pip[name] = spec
    return conda, pip, pip_lines


def test_every_pyproject_requirement_is_in_environment_yml_with_the_same_bounds():
    conda, pip, _ = _environment_requirements()
    for name, spec in _pyproject_requirements().items():
        found = conda.get(CONDA_NAMES.get(name, name), pip.get(name))
        assert found is not None, f"{name} from pyproject.toml is missing in environment.yml"
        assert found == spec, f"{name}: pyproject.toml says {spec!r}, environment.yml says {found!r}"


def test_environment_yml_has_nothing_extra_and_installs_the_package():
    conda, pip, pip_lines = _environment_requirements()
    expected = {CONDA_NAMES.get(n, n) for n in _pyproject_requirements()} | set(_pyproject_requirements())
    extra = (set(conda) | set(pip)) - expected - {"python", "pip"}
    assert not extra, f"environment.yml lists packages pyproject.toml does not: {sorted(extra)}"
    assert "-e ." in pip_lines
    python_spec = conda["python"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python_spec == requires
