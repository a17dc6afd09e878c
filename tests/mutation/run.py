"""`make mutation`: mutmut 3 on shine/solvers, shine/backward, shine/deq, shine/bilevel.

Runs mutmut on a snapshot of a git commit (``--ref``, default HEAD: uncommitted edits of the
checkout, e.g. someone's half-done configs/, cannot break the baseline run), in
``runs/mutation/work/`` (mutmut's ``mutants/`` cache lives there: a rerun only re-tests the
functions whose source or tests changed). The mutated tests are the quick tests listed in
``[tool.mutmut]`` of pyproject.toml; mutmut runs, for each mutant, only the tests that execute the
mutated function. Then writes ``runs/mutation/report.md`` and ``report.json``: per package
killed / survived / equivalent / timeout / other counts, the killed fraction of the
non-equivalent mutants, and every surviving mutant with its diff.

Equivalent mutants are listed in ``tests/mutation/equivalent.txt``: one
``<mutant id> [<fingerprint>] <reason>`` per line; the fingerprint (a hash of the mutated
lines) ties the entry to the mutant it was written for, so a renumbered mutant is not excused.
``--add-message-equivalents`` appends there the survivors whose only change is the text of an
error / log message (the rule is ``is_message_mutant``), for review before committing.

    python tests/mutation/run.py [--packages shine/backward shine/deq] [--ref HEAD] [--jobs 2]
    python tests/mutation/run.py --survivors  # re-test the survivors only (after a new test)
    python tests/mutation/run.py --report-only
    python tests/mutation/run.py --tidy-equivalents  # after source edits renumbered mutants
    python tests/mutation/run.py --check NAME [NAME ...] --tests tests/mutation/test_x.py
        # while writing a test: does it kill these mutants? (runs it against each mutant of
        # the last run's mutants/ copy, without touching mutmut's results)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shine/solvers", "shine/backward", "shine/deq", "shine/bilevel")
EQUIVALENT = Path(__file__).with_name("equivalent.txt")
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped"}
STATUS |= {36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}
STATUS |= {37: "caught by type check", -11: "segfault", -9: "segfault", None: "not checked"}


def mutant_file(name: str) -> str:
    """``shine.solvers.broyden.x_f__mutmut_3`` -> ``shine/solvers/broyden.py``."""
    return "/".join(name.split(".")[:-1]) + ".py"


def package_of(name: str) -> str:
    path = mutant_file(name)
    return next((p for p in PACKAGES if path.startswith(p + "/")), "other")


def selected(name: str, packages: list[str]) -> bool:
    """Whether the mutant belongs to one of ``packages`` (folders or module files)."""
    path = mutant_file(name)
    return any(path == p or path.startswith(p + "/") for p in packages)


def selector(package: str) -> str:
    """mutmut name glob for a package folder or a module file."""
    return package.removesuffix(".py").rstrip("/").replace("/", ".") + ".*"


def read_equivalent() -> dict[str, str]:
    """``{mutant id: "[fingerprint] reason"}`` from equivalent.txt."""
    out = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, reason = line.strip().partition(" ")
                out[name] = reason.strip()
    return out


def fingerprint(diff: str) -> str:
    """Short hash of a mutant's changed lines: an entry of equivalent.txt names the mutant it
    was written for (mutmut's numbering shifts when the function changes)."""
    changed = [
        ln.strip()
        for ln in diff.splitlines()
        if ln[:1] in "+-" and not ln.startswith(("---", "+++"))
    ]
    return hashlib.sha1("\n".join(changed).encode()).hexdigest()[:8]


def entry_matches(reason: str, diff: str) -> bool:
    """An entry ``[hash] reason`` holds for the current mutant only if the hash matches."""
    m = re.match(r"\[([0-9a-f]{8})\]", reason)
    return m is not None and m.group(1) == fingerprint(diff)


def is_cuda_only(reason: str) -> bool:
    """An entry ``[hash] cuda-only: ...``: not equivalent, only invisible without a GPU."""
    return re.sub(r"^\[[0-9a-f]{8}\]\s*", "", reason).startswith("cuda-only:")


def tidy_equivalents(work: Path) -> None:
    """Re-tie equivalent.txt to the current mutants after their functions changed.

    mutmut numbers the mutants of a function in order, so an edit renumbers them. An entry
    whose fingerprint no longer matches its mutant is moved to the surviving mutant of the same
    function with that fingerprint (the same mutated lines), if exactly one is not listed yet;
    an entry whose mutant no longer exists or is now killed (and none renumbered matches) is
    dropped. Prints each change; the rewritten file is for review before committing.
    """
    codes = collect(work)
    lines = EQUIVALENT.read_text(encoding="utf-8").splitlines()
    fp_cache: dict[str, str] = {}

    def fp(name: str) -> str:
        if name not in fp_cache:
            fp_cache[name] = fingerprint(diff_of(work, name))
        return fp_cache[name]

    def parse(line: str) -> tuple[str, str, str | None]:
        name, _, reason = line.strip().partition(" ")
        m = re.match(r"\[([0-9a-f]{8})\]", reason)
        return name, reason, m.group(1) if m else None

    entries = [ln.strip() and not ln.lstrip().startswith("#") for ln in lines]
    # first the entries that still hold where they are: their mutants are taken
    holds = {
        i: codes.get(name) == 0 and hash_ is not None and fp(name) == hash_
        for i, (name, _, hash_) in ((i, parse(ln)) for i, ln in enumerate(lines) if entries[i])
    }
    taken = {parse(lines[i])[0] for i, ok in holds.items() if ok}
    out = []
    for i, line in enumerate(lines):
        if not entries[i] or holds[i]:
            out.append(line)
            continue
        name, reason, hash_ = parse(line)
        function = name.rsplit("__mutmut_", 1)[0] + "__mutmut_"
        candidates = [
            k
            for k, v in codes.items()
            if k.startswith(function) and v == 0 and k not in taken and fp(k) == hash_
        ]
        if len(candidates) == 1:
            out.append(f"{candidates[0]} {reason}")
            taken.add(candidates[0])
            print(f"renumbered {name} -> {candidates[0].rsplit('_', 1)[1]}")
        else:
            state = "killed" if codes.get(name) not in (0, None) else "changed or gone"
            print(f"dropped {name} ({state}; {len(candidates)} matching survivors)")
    EQUIVALENT.write_text("\n".join(out) + "\n", encoding="utf-8")


_STRING = re.compile(r"""[rbfu]{0,2}("([^"\\]|\\.)*"|'([^'\\]|\\.)*')""", re.IGNORECASE)
_BARE = re.compile(r"""^\s*[rbfu]{0,2}["']""", re.IGNORECASE)
_MESSAGE_LINE = re.compile(
    r"""^\s*(raise \w+\(|logger\.\w+\(|logging\.\w+\(|warnings\.warn\(|[rbfu]{0,2}["'])"""
)


def is_message_mutant(diff: str) -> bool:
    """Whether the mutant only changes the text of an error / log / warning message.

    Rule: one line changed; the original line is a ``raise X(``, ``logger.*(``,
    ``warnings.warn(`` call or a line holding nothing but string literals (and a closing
    ``,``/``)``: the continuation of such a message; not a dict key ``"k": v``); and the two
    lines are equal once every string literal (and a ``None`` replacing it) is blanked.
    """
    minus = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    if len(minus) != 1 or len(plus) != 1 or not _MESSAGE_LINE.match(minus[0]):
        return False
    blank = lambda s: re.sub(r"\bNone\b", "S", _STRING.sub("S", s)).strip()  # noqa: E731
    if _STRING.search(minus[0]) is None or blank(minus[0]) != blank(plus[0]):
        return False
    # a bare string line must hold nothing but the string(s): not a dict key `"k": v`
    return not _BARE.match(minus[0]) or re.fullmatch(r"(S\s*)+[,)]*", blank(minus[0])) is not None


def export_snapshot(ref: str, work: Path) -> str:
    commit = subprocess.check_output(["git", "rev-parse", ref], cwd=ROOT, text=True).strip()
    work.mkdir(parents=True, exist_ok=True)
    for entry in work.iterdir():  # keep mutmut's cache (mutants/), replace the sources
        if entry.name != "mutants":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive.stdout, check=True)
    return commit


def collect(work: Path) -> dict[str, int | None]:
    exit_codes: dict[str, int | None] = {}
    for meta in sorted((work / "mutants" / "shine").rglob("*.py.meta")):
        exit_codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return exit_codes


def diff_of(work: Path, name: str) -> str:
    cwd = os.getcwd()
    os.chdir(work)
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        return get_diff_for_mutant(name, path=Path(mutant_file(name)))
    except Exception as exc:  # noqa: BLE001 (a report must not die on one odd mutant)
        return f"(no diff: {exc!r})"
    finally:
        os.chdir(cwd)


def report(work: Path, out: Path, packages: list[str], meta: dict, add_messages: bool) -> float:
    exit_codes = {k: v for k, v in collect(work).items() if selected(k, packages)}
    equivalent = read_equivalent()
    rows, survivors, new_messages, mismatched = {}, [], [], []
    files: dict[str, Counter] = {}
    for name, code in sorted(exit_codes.items()):
        status = STATUS.get(code, "suspicious")
        if status == "survived":
            diff = diff_of(work, name)
            if name in equivalent and entry_matches(equivalent[name], diff):
                status = "cuda only" if is_cuda_only(equivalent[name]) else "equivalent"
            elif name in equivalent:
                mismatched.append(name)
            elif is_message_mutant(diff):
                new_messages.append(name)
                status = "equivalent" if add_messages else status
            if status == "survived":
                survivors.append((name, diff))
        elif status == "no tests":
            survivors.append((f"{name} (no selected test executes it)", diff_of(work, name)))
        rows.setdefault(package_of(name), Counter())[status] += 1
        files.setdefault(mutant_file(name), Counter())[status] += 1
    if add_messages and new_messages:
        with EQUIVALENT.open("a", encoding="utf-8") as f:
            for name in new_messages:
                reason = "error/log message text only (no effect on any result)"
                f.write(f"{name} [{fingerprint(diff_of(work, name))}] {reason}\n")
    stale = sorted(n for n in equivalent if exit_codes.get(n) not in (0, None))  # now killed
    total = sum(rows.values(), Counter())
    rows["total"] = total
    columns = ["killed", "survived", "equivalent", "cuda only", "timeout", "no tests"]
    columns += ["not checked"]
    other = lambda c: sum(v for k, v in c.items() if k not in columns)  # noqa: E731

    def fraction(c: Counter, strict: bool = False) -> float:
        # timeouts count as killed; mutants no selected test executes ("no tests") as survivors;
        # strict: the CUDA-only ones as survivors too (no CPU test can see them)
        relevant = c["killed"] + c["survived"] + c["timeout"] + c["no tests"]
        relevant += c["cuda only"] if strict else 0
        return (c["killed"] + c["timeout"]) / relevant if relevant else float("nan")

    lines = [
        "# Mutation testing report (mutmut 3)",
        "",
        f"commit {meta['commit']}, packages {' '.join(packages)}, "
        f"last run {meta.get('run_s', 'n/a')} s for {meta.get('tested', 'n/a')} mutants "
        f"({meta.get('rate', 'n/a')} mutants/s)",
        "",
        "killed fraction = (killed + timeout) / (killed + timeout + survived + no tests); "
        "equivalent mutants (tests/mutation/equivalent.txt) are left out; not checked ones "
        '(run interrupted) too. "cuda only": mutants that only change a device argument '
        "(visible on a GPU only; their tests are marked `gpu`), left out of the killed "
        "fraction and counted as survivors in the strict one",
        "",
        "| package | " + " | ".join(columns) + " | other | killed fraction | strict |",
        "|---" * (len(columns) + 4) + "|",
    ]

    def row(label: str, c: Counter) -> str:
        cells = " | ".join(str(c[k]) for k in columns)
        return f"| {label} | {cells} | {other(c)} | {fraction(c):.3f} | {fraction(c, True):.3f} |"

    lines += [row(pkg, c) for pkg, c in rows.items()]
    lines += ["", "| file | " + " | ".join(columns) + " | other | killed fraction | strict |"]
    lines.append("|---" * (len(columns) + 4) + "|")
    lines += [row(path, c) for path, c in sorted(files.items())]
    if new_messages and not add_messages:
        lines += [
            "",
            f"{len(new_messages)} survivors only change a message text: rerun with "
            "--add-message-equivalents to list them as equivalent (then review)",
        ]
    if mismatched:
        lines += [
            "",
            "Entries of equivalent.txt whose fingerprint no longer matches the mutant (its "
            "function changed; counted as survived until reviewed): " + ", ".join(mismatched),
        ]
    if stale:
        lines += ["", "Stale entries of equivalent.txt (now killed): " + ", ".join(stale)]
    lines += ["", f"## Surviving mutants ({len(survivors)})", ""]
    for name, diff in survivors:
        lines += [f"### {name}", "", "```diff", diff.strip(), "```", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {
        pkg: dict(c) | {"killed_fraction": fraction(c), "strict_fraction": fraction(c, True)}
        for pkg, c in rows.items()
    }
    result = meta | {
        "packages": packages,
        "counts": summary,
        "survivors": [n for n, _ in survivors],
    }
    (out / "report.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print("\n".join(lines[: lines.index(f"## Surviving mutants ({len(survivors)})")]))
    print(f"report: {out / 'report.md'}")
    return fraction(total)


def check(work: Path, names: list[str], tests: list[str]) -> int:
    """Run ``tests`` (paths relative to the checkout) against each mutant in ``names`` in the
    last run's ``mutants/`` copy; print killed / survived per mutant. The mutants' cache and
    results are left alone; the test files are copied in (the current version of each)."""
    mutants = work / "mutants"
    if not (mutants / "shine").is_dir():
        print(f"no mutants in {mutants}: run `make mutation` first", file=sys.stderr)
        return 2
    for test in tests:
        target = mutants / test
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / test, target)
    env = os.environ | {"PYTHONPATH": str(mutants), "OMP_NUM_THREADS": "1"}
    # one process for all the mutants: the trampolines read MUTANT_UNDER_TEST at each call
    driver = (
        "import contextlib, io, os, sys, pytest\n"
        "args = ['-x', '-q', '-p', 'no:cacheprovider', *sys.argv[2:]]\n"
        "for name in [''] + sys.argv[1].split(','):\n"
        "    os.environ['MUTANT_UNDER_TEST'] = name\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        code = int(pytest.main(args))\n"
        "    if not name and code:\n"
        "        sys.exit('the tests fail without a mutant: fix them first')\n"
        "    if name:\n"
        "        print('survived' if code == 0 else 'killed  ', name, flush=True)\n"
    )
    cmd = [sys.executable, "-c", driver, ",".join(names), *tests]
    run = subprocess.run(cmd, cwd=mutants, env=env, capture_output=True, text=True)
    print(run.stdout, end="")
    if run.returncode:
        print(run.stderr[-2000:], file=sys.stderr)
        return 2
    survived = run.stdout.count("survived ")
    print(f"{len(names) - survived} killed, {survived} survived")
    return 1 if survived else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", nargs="*", default=list(PACKAGES))
    parser.add_argument("--ref", default="HEAD", help="git commit to mutate")
    parser.add_argument("--jobs", type=int, default=2, help="mutmut --max-children")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "mutation")
    parser.add_argument("--work", type=Path, help="mutmut's working dir (default OUT/work)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="re-test only the surviving (and untested) non-equivalent mutants (after a new test)",
    )
    parser.add_argument("--add-message-equivalents", action="store_true")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument(
        "--tidy-equivalents",
        action="store_true",
        help="re-tie equivalent.txt to renumbered mutants by fingerprint, drop killed entries",
    )
    parser.add_argument("--check", nargs="+", metavar="MUTANT", help="mutants to run --tests on")
    parser.add_argument("--tests", nargs="+", default=[], help="test files for --check")
    args = parser.parse_args()
    work = args.work or args.out / "work"
    if args.tidy_equivalents:
        tidy_equivalents(work)
        return 0
    if args.check:
        return check(work, args.check, args.tests or ["tests/mutation"])
    packages = [p.rstrip("/") for p in args.packages]
    meta_path = work.parent / "run.json"
    if args.report_only:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"commit": "?"}
    else:
        commit = export_snapshot(args.ref, work)
        env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        mutmut = str(Path(sys.executable).with_name("mutmut"))
        # named mutants are always re-tested: name them only for a restricted run (all the
        # packages: mutmut's cache re-tests only what changed)
        names = [] if set(packages) == set(PACKAGES) else [selector(p) for p in packages]
        if args.survivors:
            equivalent = read_equivalent()
            names = [
                k
                for k, v in collect(work).items()
                if STATUS.get(v) in ("survived", "no tests")
                and selected(k, packages)
                and k not in equivalent
            ]
            if not names:
                print("no surviving mutant to re-test")
        cmd = [mutmut, "run", "--max-children", str(args.jobs), *names]
        shown = " ".join(cmd[:8]) + (f" ... ({len(names)} names)" if len(cmd) > 8 else "")
        print(shown, f"(in {work}, commit {commit[:10]})", flush=True)
        start = time.time()
        skip = args.survivors and not names
        rc = 0 if skip else subprocess.run(cmd, cwd=work, env=env).returncode
        run_s = round(time.time() - start)
        after = sum(1 for k, v in collect(work).items() if v is not None and selected(k, packages))
        # mutants tested by this run: the named ones, else those the cache did not answer
        # an incremental run of all the packages re-tests the changed functions' mutants,
        # which mutmut does not count for us: "n/a" then
        n = len(names) if args.survivors else (after if names else None)
        meta = {
            "commit": commit,
            "run_s": run_s,
            "tested": n if n is not None else "n/a",
            "rc": rc,
        }
        meta["rate"] = round(n / max(run_s, 1), 2) if n is not None else "n/a"
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(meta))
        if rc:
            print(f"mutmut exited with {rc}", file=sys.stderr)
    killed = report(work, args.out, packages, meta, args.add_message_equivalents)
    return 0 if killed >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
