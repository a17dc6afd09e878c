"""One source of truth for versions: environment.yml must mirror pyproject.toml exactly."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(lines: list[str]) -> dict[str, SpecifierSet]:
    pins = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in pins, f"{name} listed twice"
        pins[name] = req.specifier
    return pins


def pyproject_pins(
    extras: tuple[str, ...] = ("dev", "bench", "mutation"),
) -> dict[str, SpecifierSet]:
    project = _pyproject()["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return _pins(lines)


def environment_yml() -> tuple[str, dict[str, SpecifierSet]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    requirements = [line for line in pip_section if not line.startswith("-")]
    return python, _pins(requirements)


def test_environment_yml_mirrors_pyproject():
    _, conda = environment_yml()
    pip = pyproject_pins()
    assert sorted(conda) == sorted(pip), "package lists differ"
    for name, spec in pip.items():
        assert str(conda[name]) == str(spec), f"{name}: environment.yml {conda[name]} != {spec}"


def test_conda_python_satisfies_requires_python():
    python, _ = environment_yml()
    version = python.split("=")[-1]
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert requires.contains(version + ".0")


def test_heavy_packages_are_pinned_exactly():
    # an unpinned torch drags in several GB of CUDA wheels (README section 2)
    pins = pyproject_pins()
    for name in ("torch", "torchvision"):
        assert str(pins[name]).startswith("=="), name


def test_installed_versions_satisfy_pins():
    for name, spec in pyproject_pins(extras=("dev",)).items():
        installed = metadata.version(name)
        assert spec.contains(installed, prereleases=True), f"{name} {installed} not in {spec}"
