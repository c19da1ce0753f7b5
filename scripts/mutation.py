"""Mutation testing of the loss, op and reference modules with mutmut (run it through scripts/mutation.sh).

1. A snapshot of the package, its tests and csrc/ (the working tree, or the commit given with --rev) is
   taken into ``mutants/snapshot/``; everything below runs there, so edits made meanwhile do not mix in.
2. The fast tests configured in ``[tool.mutmut]`` run once on the unmodified snapshot; tests failing
   there are deselected for the run (a mutant is only judged by tests that pass without it) and listed.
3. ``mutmut run`` with one worker (``--workers N``: N) over the mutants of the named modules (default:
   all configured ones).
4. The score per module and every surviving mutant (file:line in the snapshot, and its diff) are
   printed and written to ``mutants/mutation-report.md``.
A stopped run (Ctrl-C, end of the day) keeps its results in ``mutants/``; ``--resume`` continues it where
it stopped, with the same snapshot and tests: only the mutants without a verdict are named to mutmut
(which reruns every mutant a name or pattern matches, judged or not).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "mutants"
SNAPSHOT = OUT / "snapshot"
REPORT = OUT / "mutation-report.md"
TIMES = OUT / "mutant-times.txt"
RUN_STATE = OUT / "run.json"  # what --resume needs: the snapshot's description, deselected tests, modules
SNAPSHOT_PATHS = ("fastrl_kernels", "tests", "csrc", "pyproject.toml")


def git(*args: str, text: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=text)


def take_snapshot(rev: str | None, source_rev: str | None = None) -> str:
    """Copies the measured tree into SNAPSHOT; returns its description (commit, and whether edited).
    With ``source_rev`` the package and csrc/ come from that commit, the tests from the measured tree."""
    described = _copy_tree(rev)
    if source_rev is not None:
        for name in ("fastrl_kernels", "csrc"):
            shutil.rmtree(SNAPSHOT / name)
        _extract(source_rev, ("fastrl_kernels", "csrc"))
        described = f"source of {git('rev-parse', '--short', source_rev).stdout.strip()}, tests of {described}"
    return described


def _extract(rev: str, paths) -> None:
    archive = git("archive", "--format=tar", rev, *paths, text=False)
    if archive.returncode:
        sys.exit(f"mutation: git archive {rev} failed: {archive.stderr.decode()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # The "tar" filter (Python >= 3.10.12) keeps links inside the destination.
        tar.extractall(SNAPSHOT, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))


def _copy_tree(rev: str | None) -> str:
    shutil.rmtree(OUT, ignore_errors=True)
    SNAPSHOT.mkdir(parents=True)
    if rev is not None:
        _extract(rev, SNAPSHOT_PATHS)
        return git("rev-parse", "--short", rev).stdout.strip()
    described = git("rev-parse", "--short", "HEAD").stdout.strip()
    if git("diff", "--quiet", "HEAD", "--", *SNAPSHOT_PATHS).returncode:
        described += " + uncommitted edits"
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache")
    for name in SNAPSHOT_PATHS:
        if (ROOT / name).is_dir():
            # symlinks=True keeps fastrl_kernels/csrc a link to ../csrc, as in the repository.
            shutil.copytree(ROOT / name, SNAPSHOT / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, SNAPSHOT / name)
    return described


def mutmut_config() -> dict:
    return tomllib.loads((SNAPSHOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def select_files(args: list[str], config: dict) -> list[Path]:
    """The configured files under the paths named on the command line (all of them when none is)."""
    files = sorted(p.relative_to(SNAPSHOT) for p in (SNAPSHOT / "fastrl_kernels").rglob("*.py"))
    files = [p for p in files if any(fnmatch.fnmatch(str(p), pattern) for pattern in config["only_mutate"])]
    if not args:
        return files
    chosen = []
    for arg in args:
        target = Path(arg.rstrip("/"))
        matched = [f for f in files if f == target or target in f.parents]
        if not matched:
            sys.exit(f"mutation: {arg} is not among the mutated modules ({', '.join(config['only_mutate'])})")
        chosen += [f for f in matched if f not in chosen]
    return chosen


def has_functions(path: Path) -> bool:
    # mutmut mutates function and method bodies only; module-level code is left alone.
    tree = ast.parse((SNAPSHOT / path).read_text())
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(tree))


def module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def failing_tests(config: dict, env: dict) -> list[str]:
    """pytest options deselecting the selected tests that fail on the unmodified snapshot."""
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "--continue-on-collection-errors"]
    command += config["pytest_add_cli_args"] + config["pytest_add_cli_args_test_selection"]
    result = subprocess.run(command, cwd=SNAPSHOT, env=env, capture_output=True, text=True)
    options = []
    for match in re.finditer(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", result.stdout, re.MULTILINE):
        node = match.group(2).strip()
        # A test file that does not even import is ignored; a failing test is deselected.
        options += ["--deselect", node] if "::" in node else ["--ignore", node]
    if result.returncode not in (0, 1):  # 1: some tests failed; anything else: pytest itself failed
        sys.exit(f"mutation: the tests could not run on the unmodified code:\n{result.stdout}{result.stderr}")
    return options


def first_changed_line(path: Path, mutant: str) -> tuple[int, list[str]]:
    """The source line of a mutant's first change, and the -/+ lines of its diff."""
    import libcst as cst
    from mutmut.mutation.diff_apply import read_functions_from_index
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    orig, mutated = read_functions_from_index(mutant, path)
    orig_lines = cst.Module([orig]).code.strip().split("\n")
    mutated_lines = cst.Module([mutated]).code.strip().split("\n")
    changes = [op for op in difflib.SequenceMatcher(a=orig_lines, b=mutated_lines).get_opcodes() if op[0] != "equal"]
    diff = [f"- {line.strip()}" for op in changes for line in orig_lines[op[1] : op[2]]]
    diff += [f"+ {line.strip()}" for op in changes for line in mutated_lines[op[3] : op[4]]]
    # Line numbers inside the function text, anchored on its `def` line in the snapshot's file.
    function, class_name = orig_function_and_class_names_from_key(mutant)
    def_index = next(i for i, line in enumerate(orig_lines) if re.match(rf"\s*(async\s+)?def {function}\b", line))
    scope = ast.parse((SNAPSHOT / path).read_text()).body
    if class_name:
        scope = next(n.body for n in scope if isinstance(n, ast.ClassDef) and n.name == class_name)
    node = next(n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function)
    return node.lineno + changes[0][1] - def_index, diff


def unjudged_mutants(files: list[Path]) -> list[str]:
    """The mutants of ``files`` that mutmut generated in the snapshot but has no verdict for yet."""
    names = []
    for path in files:
        meta = SNAPSHOT / "mutants" / f"{path}.meta"
        if meta.exists():
            verdicts = json.loads(meta.read_text())["exit_code_by_key"]
            names += [name for name, code in verdicts.items() if code is None]
    return names


def report(files: list[Path], deselected: list[str], seconds: dict, measured: str) -> int:
    from importlib.metadata import version

    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    os.chdir(SNAPSHOT)  # mutmut's readers take paths relative to the project it ran in
    lines = [
        "# Mutation testing report",
        "",
        f"mutmut {version('mutmut')} on {measured}, {time.strftime('%Y-%m-%d %H:%M')}; "
        f"baseline tests {seconds['baseline']:.0f} s, mutmut {seconds['mutmut']:.0f} s in all.",
        "",
    ]
    if deselected:
        lines += ["Deselected (they fail on the unmodified code): " + " ".join(deselected[1::2]), ""]
    lines += ["| module | killed | survived | timeout | no tests | other | score | mutant test time |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    survivors, totals = [], Counter()
    seconds_by_mutant = {}
    if TIMES.exists():
        seconds_by_mutant = {name: float(t) for name, t in (line.split() for line in TIMES.read_text().splitlines())}
    for path in files:
        data = SourceFileMutationData(path=path)
        data.load()
        counts = Counter(status_by_exit_code[code] for code in data.exit_code_by_key.values())
        totals.update(counts)
        total = sum(counts.values())
        other = total - sum(counts[s] for s in ("killed", "survived", "timeout", "no tests"))
        score = f"{counts['killed'] / total:.1%}" if total else "-"
        spent = sum(seconds_by_mutant.get(mutant, 0.0) for mutant in data.exit_code_by_key)
        lines.append(
            f"| {path} | {counts['killed']} | {counts['survived']} | {counts['timeout']} | {counts['no tests']}"
            f" | {other} | {score} | {spent:.0f} s |"
        )
        for mutant, code in data.exit_code_by_key.items():
            status = status_by_exit_code[code]
            # "not checked": outside this run (other modules' mutants, or the unnamed ones of a module).
            if status not in ("killed", "timeout", "not checked"):
                survivors.append((path, mutant, status))
    total = sum(totals.values())
    lines.append(
        f"| all | {totals['killed']} | {totals['survived']} | {totals['timeout']} | {totals['no tests']} |"
        f" {total - sum(totals[s] for s in ('killed', 'survived', 'timeout', 'no tests'))} |"
        f" {totals['killed'] / max(total, 1):.1%} | |"
    )
    lines += ["", f"## Surviving mutants ({len(survivors)}, with the no-tests and suspicious ones)", ""]
    for path, mutant, status in survivors:
        line, diff = first_changed_line(path, mutant)
        lines.append(f"- {path}:{line} `{mutant}` ({status})")
        lines += [f"      {change}" for change in diff]
    REPORT.write_text("\n".join(lines) + "\n")
    summary_end = next(i for i, line in enumerate(lines) if line.startswith("## "))
    print("\n".join(lines[:summary_end]))
    print(f"\n{len(survivors)} surviving mutants, with diffs: {REPORT.relative_to(ROOT)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*",
                        help="files or folders among the mutated ones (default: all), or mutant names")
    parser.add_argument("--rev", help="measure this commit instead of the working tree")
    parser.add_argument("--source-rev", help="the package and csrc/ of this commit, the tests of the tree (or --rev)")
    parser.add_argument("--workers", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped run in mutants/ (its snapshot, tests and results kept)")
    args = parser.parse_args()
    if args.resume:
        if not RUN_STATE.exists():
            sys.exit("mutation: no stopped run to resume in mutants/ (start one without --resume)")
        state = json.loads(RUN_STATE.read_text())
        measured, deselected = state["measured"], state["deselected"]
        args.modules = args.modules or state["modules"]
    else:
        measured = take_snapshot(args.rev, args.source_rev)
    config = mutmut_config()
    # Mutant names (<module>.x_<function>__mutmut_<n>) rerun just those mutants, e.g. the survivors of a
    # report against newer tests; other arguments name files or folders.
    names = [a for a in args.modules if "__mutmut_" in a]
    paths = [a for a in args.modules if "__mutmut_" not in a]
    if names:
        paths += sorted({name.split(".x")[0].replace(".", "/") + ".py" for name in names})
    files = select_files(paths, config)
    skipped = [f for f in files if not has_functions(f)]
    files = [f for f in files if f not in skipped]
    if skipped:
        print(f"No functions, nothing to mutate: {' '.join(map(str, skipped))}")
    if not files:
        return 0

    # The C++ backend compiles from the snapshot's csrc/ (and mutmut's copy of it); a build directory
    # of their own keeps those from rebuilding over (and being rebuilt by) the checkout's build.
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastrl_kernels" / "mutation"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache / "snapshot"))
    seconds = {"baseline": 0.0}
    if not args.resume:
        start = time.monotonic()
        print(f"Running the selected tests on the unmodified code ({measured})...", flush=True)
        deselected = failing_tests(config, env)
        seconds["baseline"] = time.monotonic() - start
        RUN_STATE.write_text(json.dumps({"measured": measured, "deselected": deselected,
                                         "modules": [str(f) for f in files]}))
    if deselected:
        print("Deselected, as they fail on the unmodified code:", " ".join(deselected[1::2]))

    # mutmut runs pytest in-process, which reads PYTEST_ADDOPTS: the deselection reaches every run, and
    # so does the plugin timing each mutant's tests (scripts/ on the path for it).
    addopts = f"{shlex.join(deselected + ['-p', 'mutation_timing'])} {os.environ.get('PYTEST_ADDOPTS', '')}"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "scripts"), os.environ.get("PYTHONPATH")]))
    env.update(PYTEST_ADDOPTS=addopts.strip(), PYTHONPATH=pythonpath, FASTRL_MUTATION_TIMES=str(TIMES))
    env.update(TORCH_EXTENSIONS_DIR=str(cache / "mutants"))
    # Mutant names are <module>.x_<function>__mutmut_<n> or <module>.xǁ<Class>ǁ<method>__mutmut_<n>.
    patterns = names or [f"{module_name(f)}.x*" for f in files]
    if args.resume and not names:
        # mutmut reruns every mutant a pattern names, verdict or not: a resume names only those without one.
        patterns = unjudged_mutants(files)
        print(f"Resuming: {len(patterns)} mutants without a verdict", flush=True)
        if not patterns:
            return report(files, deselected, seconds | {"mutmut": 0.0}, measured)
    mutmut = Path(sys.executable).with_name("mutmut")
    start = time.monotonic()
    run = subprocess.run([str(mutmut), "run", "--max-children", str(args.workers), *patterns], cwd=SNAPSHOT, env=env)
    seconds["mutmut"] = time.monotonic() - start
    if run.returncode != 0:
        print(f"mutation: mutmut exited with {run.returncode}", file=sys.stderr)
        return run.returncode
    return report(files, deselected, seconds, measured)


if __name__ == "__main__":
    sys.exit(main())
