"""Repository layout and library-purity rules (style guide of the project)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_FILES = sorted((ROOT / "shine").rglob("*.py"))


@pytest.mark.parametrize(
    "directory", ["configs", "shine", "experiments", "scripts", "figures", "slurm", "tests"]
)
def test_top_level_directory_exists_and_explains_itself(directory):
    path = ROOT / directory
    assert path.is_dir()
    if directory not in ("shine", "tests"):
        assert (path / "README.md").is_file()


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_never_imports_hydra_nor_prints(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert not {"hydra", "omegaconf"} & _imports(tree), "Hydra belongs to train.py only"
    prints = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
    ]
    assert not prints, f"print() at lines {prints}: use logging"


def test_instantiate_is_called_only_by_train_py():
    callers = [
        p.relative_to(ROOT).as_posix()
        for p in [ROOT / "train.py", *LIBRARY_FILES, *(ROOT / "scripts").glob("*.py")]
        if "instantiate(" in p.read_text(encoding="utf-8")
    ]
    assert callers == ["train.py"]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [
        line.strip()
        for line in ci.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[0] == "set -euo pipefail" and commands[-1] == "make test"
    assert "make test" in (ROOT / "README.md").read_text()


NUMERICS = ("solvers", "backward", "deq", "bilevel", "models")
HARNESS = (
    "shine.harness.runtime",
    "shine.harness.tasks",
    "shine.harness.training",
    "shine.data",
    "shine.analysis",
)


@pytest.mark.parametrize("package", NUMERICS)
def test_numerics_do_not_depend_on_the_harness(package):
    # the solvers, backward strategies, DEQ layer, bi-level problems and models are usable
    # without run directories, tasks, training loops or data loading
    for path in sorted((ROOT / "shine" / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
        bad = sorted(m for m in modules if m.startswith(HARNESS))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_scripts_import_their_shared_code_from_the_package():
    # the analysis code the scripts share is shine.analysis: no script edits sys.path, no script
    # imports another one (each runs as `python scripts/NAME.py`)
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    names = {p.stem for p in scripts}
    for path in scripts:
        text = path.read_text(encoding="utf-8")
        assert "sys.path" not in text, f"{path.name} edits sys.path"
        imported = _imports(ast.parse(text))
        assert not imported & names, f"{path.name} imports the scripts {imported & names}"


def test_citation_and_pre_commit_are_in_step_with_the_project():
    import yaml

    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["authors"]
    assert citation["preferred-citation"]["year"] == 2022
    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"][0]
    pinned = re.search(r'"ruff==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert hooks["rev"] == "v" + pinned
    assert {h["id"] for h in hooks["hooks"]} == {"ruff", "ruff-format"}
