"""The README's quick start, followed on a fresh clone.

``git clone`` of this repository into a temporary directory, with the working tree's uncommitted
changes (modified, deleted, and untracked non-ignored files) applied on top, so that it holds
what the next commit will (on a clean checkout, as in CI, the clone alone). The README's main
command, ``make demo``, then runs there with this test's Python environment
(``VENV=<sys.prefix>``: installed from the same ``pyproject.toml``, so ``make`` installs nothing;
``PYTHONPATH`` points at the clone so that the scripts import the clone's ``shine``, not the
editable install's) and a clean environment (no ``SHINE_RUNS`` / ``SHINE_DATA``, no ``MAKEFLAGS``
of an outer ``make``), and its outputs are checked. ~1.5-2 min, hence ``slow``.

A quick test keeps the README's quick-start block equal to the commands this file runs (and the
one it cannot run from inside the test suite), so README and test cannot drift apart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the quick-start commands this test runs on the fresh clone
RUN_HERE = ["make demo"]
#: the quick-start commands it does not run: `make test` is the suite this test belongs to
NOT_RUN_HERE = ["make test"]
SUMMARY_LINES = (
    "== bi-level: l2-logistic regression on the 20news-sized synthetic set",
    "method.mode=faithful: the authors' algorithm",
    "method.mode=robust: ours",
    "speed-up of SHINE over HOAG (faithful):",
    "speed-up of SHINE over HOAG (robust):",
    "== DEQ: tiny MDEQ on digits",
    "backward speed-up of SHINE over the original implicit backward:",
    "demo done in",
)


def quick_start_commands(readme: str) -> list[str]:
    """The commands of the first ``bash`` block of the README's "Quick start" section."""
    match = re.search(r"^## \d+\. Quick start\n(.*?)(?=^## )", readme, re.S | re.M)
    assert match, "README.md has no '## N. Quick start' section"
    block = re.search(r"```bash\n(.*?)```", match.group(1), re.S)
    assert block, "the Quick start section has no ```bash block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [c for c in commands if c]


def test_readme_quick_start_is_what_the_fresh_clone_test_runs():
    commands = quick_start_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert commands == RUN_HERE + NOT_RUN_HERE


def test_quick_start_parser_sees_commands_not_comments():
    readme = "## 2. Quick start\n\n```bash\nmake a   # x\n        # y\nmake b\n```\n\n## 3. Next\n"
    assert quick_start_commands(readme) == ["make a", "make b"]


def _git(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def fresh_clone(dest: Path) -> None:
    """Clone the repository to ``dest`` and apply the working tree's uncommitted changes."""
    _git("clone", "--quiet", "--no-hardlinks", str(ROOT), str(dest))
    changed = _git("ls-files", "-z", "--modified", "--others", "--exclude-standard")
    for rel in filter(None, changed.split("\0")):
        src, dst = ROOT / rel, dest / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif dst.is_file():  # deleted in the working tree
            dst.unlink()


def _installed_from_same_pyproject(venv: Path, pyproject: Path) -> bool:
    """Whether the Makefile's install stamp of ``venv`` holds ``pyproject``'s checksum."""
    stamp = venv / ".installed-dev"
    proc = subprocess.run(["cksum"], input=pyproject.read_bytes(), capture_output=True, check=True)
    return stamp.is_file() and stamp.read_text().strip() == proc.stdout.decode().strip()


@pytest.mark.slow
def test_make_demo_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "shine"
    fresh_clone(clone)
    venv = Path(sys.prefix)
    if not _installed_from_same_pyproject(venv, clone / "pyproject.toml"):
        pytest.fail(
            f"{venv} was not installed from this pyproject.toml (its .installed-dev stamp "
            "differs): run `make venv` first, or `make demo` would re-install it from the "
            "temporary clone"
        )
    stamp_before = (venv / ".installed-dev").read_text()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SHINE_RUNS", "SHINE_DATA", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    }
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(clone)
    start = time.time() - 1  # file times may be rounded down to the second
    (command,) = RUN_HERE
    proc = subprocess.run(
        [*command.split(), f"VENV={venv}"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]

    # nothing was installed into the shared environment
    assert "pip install" not in proc.stdout
    assert (venv / ".installed-dev").read_text() == stamp_before
    # the printed summary: speed-ups and losses / accuracies
    for line in SUMMARY_LINES:
        assert line in proc.stdout, (line, proc.stdout[-3000:])
    for method in ("hoag", "shine", "jacobian_free"):
        found = re.findall(rf"^\s+{method}\s+final loss\s+\d", proc.stdout, re.M)
        assert len(found) == 2, method  # one line per mode
    for method in ("original", "shine", "jacobian_free"):
        assert re.search(rf"^\s+{method}\s+top-1\s+\d", proc.stdout, re.M), method
    # the figures and tables it made (fresh, not the committed copies), non-empty
    produced = [
        clone / "figures" / "demo" / "demo.pdf",
        clone / "figures" / "demo" / "demo.png",
        clone / "figures" / "opa_inversion.pdf",
        clone / "figures" / "opa_inversion.png",
        clone / "runs" / "demo" / "demo" / "runs.csv",
        clone / "runs" / "demo" / "demo" / "summary.csv",
        clone / "runs" / "opa_inversion" / "seed=0" / "summary.json",
    ]
    for method in ("original", "shine", "jacobian_free"):
        produced.append(clone / "runs" / f"digits_{method}" / "seed=0" / "summary.json")
    for path in produced:
        assert path.is_file(), path
        assert path.stat().st_size > 0, path
        assert path.stat().st_mtime >= start, f"{path} was not written by the demo"


DOCS = ("README.md", "experiments/README.md")


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_name_existing_configs_scripts_and_targets(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    names = re.findall(r"\b(experiment|sweep|dataset|hydra/launcher)=([a-z][a-z0-9_]*)", text)
    assert len(names) > 10
    for group, name in names:
        if name.endswith("_"):  # a pattern such as `digits_{original,...}` or `cifar_METHOD`
            continue
        assert (ROOT / "configs" / group / f"{name}.yaml").is_file(), (doc, group, name)
    for script in re.findall(r"scripts/([a-z_]+\.py)", text):
        assert (ROOT / "scripts" / script).is_file(), (doc, script)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    for target in re.findall(r"`make ([a-z][a-z-]*)", text):
        assert target in targets, (doc, target)
