#!/usr/bin/env python
"""Run scikit-learn's own MLP test file against backprop's estimators, once per backend.

    python benchmarks/sklearn_conformance.py                       # numpy and numba, at least 57 passed each
    python benchmarks/sklearn_conformance.py --backends numpy --min-passed 50 --json conformance.json
    python benchmarks/sklearn_conformance.py --baseline            # also the unmodified file, for comparison

The test file is that of the installed scikit-learn (``sklearn/neural_network/tests/test_mlp.py``, found
through ``importlib``); nothing of it is kept in this repository. It is copied into a temporary folder with one
line changed, its import of the estimators::

    from sklearn.neural_network import MLPClassifier, MLPRegressor
    ->  from backprop.sklearn import MLPClassifier, MLPRegressor

(the run stops with an error if that line is not found exactly once: scikit-learn changed its test file, and
this script must follow), then ``python -m pytest -p sklearn.conftest -q -rf <copy>`` runs from that folder
(scikit-learn's fixtures, such as ``global_random_seed``, come from its ``conftest`` module) with
``BACKPROP_BACKEND`` naming the backend. ``--baseline`` also runs the unmodified copy against scikit-learn's
own estimators. Printed per run: the counts of passed, failed and skipped tests (read from pytest's JUnit XML
report) and the names of the tests that failed or were skipped, with the reason; ``--json`` writes the same.

Exit status: 0 when every backend has at least ``--min-passed`` tests passed; 1 when one has fewer (or pytest
could not run the copy, or the import line was not found exactly once); 2 on a bad option; 3 when scikit-learn,
its test file or its ``conftest`` module is not installed here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

try:
    from backprop.bench.cli import (
        backend_name, doc_parser, json_path, non_negative_int, positive_float, require_backends,
    )
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from backprop.bench.cli import (
        backend_name, doc_parser, json_path, non_negative_int, positive_float, require_backends,
    )
from backprop.backend import ENV_VAR
from backprop.kernels import BACKEND_MODULES

PROG = "python benchmarks/sklearn_conformance.py"
#: The test file, relative to the installed ``sklearn`` package.
TEST_FILE = Path("neural_network") / "tests" / "test_mlp.py"
#: The import line of scikit-learn's estimators in the test file, and what it becomes.
ORIGINAL = "from sklearn.neural_network import MLPClassifier, MLPRegressor"
IMPORT_LINE = re.compile(rf"^{re.escape(ORIGINAL)}[ \t]*$", re.MULTILINE)
REPLACEMENT = "from backprop.sklearn import MLPClassifier, MLPRegressor"
#: Exit status when scikit-learn's test file (or its conftest module) is not installed.
NOT_INSTALLED = 3
#: The name of the baseline run (the unmodified file, scikit-learn's estimators).
BASELINE = "scikit-learn"
#: Characters of pytest's output kept in the JSON file, from its end.
OUTPUT_TAIL = 4000


class NotInstalled(Exception):
    """scikit-learn, its MLP test file or its conftest module is not installed here."""


def locate_test_file() -> Path:
    """The installed scikit-learn's ``neural_network/tests/test_mlp.py`` (:class:`NotInstalled` if absent, or
    if ``sklearn.conftest``, which provides the file's fixtures, is)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise NotInstalled("scikit-learn is not installed")
    path = Path(spec.origin).parent / TEST_FILE
    if not path.is_file():
        raise NotInstalled(f"scikit-learn's test file {path} is not installed (a build without its tests?)")
    if importlib.util.find_spec("sklearn.conftest") is None:
        raise NotInstalled("scikit-learn's conftest module (sklearn/conftest.py) is not installed")
    return path


def rewritten(source: str) -> str:
    """``source`` with its one import of scikit-learn's estimators replaced by backprop's (``ValueError`` if
    that line is not found exactly once)."""
    found = len(IMPORT_LINE.findall(source))
    if found != 1:
        raise ValueError(f"the line {ORIGINAL!r} occurs {found} times in scikit-learn's test file, "
                         "not once: the file changed, and this script must follow")
    return IMPORT_LINE.sub(REPLACEMENT, source)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_junit(path: Path) -> dict[str, Any]:
    """Counts and names from pytest's JUnit XML report: a test with a failure or an error is failed (an error
    is named so), a skipped one (``xfail`` included) skipped, any other passed."""
    passed: list[str] = []
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        tags = {child.tag: child for child in case}
        bad = tags.get("failure", tags.get("error"))
        if bad is not None:
            why = (bad.get("message") or "").strip().splitlines()
            failed[name] = ("error: " if bad.tag == "error" else "") + _short(why[0] if why else bad.tag)
        elif "skipped" in tags:
            skipped[name] = _short((tags["skipped"].get("message") or "").strip())
        else:
            passed.append(name)
    return {"passed": len(passed), "failed": len(failed), "skipped": len(skipped),
            "failed_tests": failed, "skipped_tests": skipped, "passed_tests": passed}


def run_copy(source: str, backend: str | None, timeout: float) -> dict[str, Any]:
    """Write ``source`` as ``test_mlp.py`` into a fresh temporary folder and run pytest on it there, with
    ``$BACKPROP_BACKEND`` set to ``backend`` (left as it is for ``None``)."""
    with tempfile.TemporaryDirectory(prefix="sklearn-conformance-") as tmp:
        folder = Path(tmp)
        copy = folder / "test_mlp.py"
        copy.write_text(source)
        (folder / "pytest.ini").write_text("[pytest]\n")  # this folder is the rootdir: no outer configuration
        report = folder / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-p", "sklearn.conftest", "-q", "-rf", str(copy.name),
               "-p", "no:cacheprovider", f"--junitxml={report.name}"]
        env = dict(os.environ)
        if backend is not None:
            env[ENV_VAR] = backend
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            rc, output = None, (out.decode(errors="replace") if isinstance(out, bytes) else out)
            output += f"\n(stopped after {timeout:g} s: --timeout)"
        seconds = time.perf_counter() - start
        result: dict[str, Any] = {"pytest_exit": rc, "seconds": round(seconds, 2),
                                  "command": " ".join(shlex.quote(c) for c in cmd)}
        if rc in (0, 1) and report.is_file():
            result.update(read_junit(report))
            result["ran"] = True
        else:  # pytest could not run the file (collection error, usage error, no test, timeout)
            result.update({"passed": 0, "failed": 0, "skipped": 0, "failed_tests": {}, "skipped_tests": {},
                           "passed_tests": [], "ran": False})
        result["output_tail"] = output[-OUTPUT_TAIL:]
    return result


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__)
    p.add_argument("--backends", nargs="+", type=backend_name, default=["numpy", "numba"],
                   help=f"backends to run the file on (default: numpy numba); known: {', '.join(BACKEND_MODULES)}")
    p.add_argument("--min-passed", type=non_negative_int, default=57,
                   help="tests each backend must pass for exit status 0 (default 57)")
    p.add_argument("--baseline", action="store_true",
                   help="also run the unmodified file against scikit-learn's own estimators")
    p.add_argument("--timeout", type=positive_float, default=1800.0,
                   help="seconds one pytest run may take (default 1800)")
    p.add_argument("--json", type=json_path, default=None, help="also write the results to this file")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every backend must work here (``parser.error``, exit status 2, naming the option otherwise)."""
    args.backends = list(dict.fromkeys(args.backends))
    require_backends(parser, args.backends, ", far too slowly")


def _print_run(name: str, res: dict[str, Any], min_passed: int | None) -> None:
    verdict = "" if min_passed is None else ("  ok" if res["ran"] and res["passed"] >= min_passed
                                             else f"  BELOW --min-passed {min_passed}")
    print(f"{name:<20} {res['passed']:>6} {res['failed']:>6} {res['skipped']:>7} {res['seconds']:>8.1f}{verdict}")
    if not res["ran"]:
        how = "timed out" if res["pytest_exit"] is None else f"exit status {res['pytest_exit']}"
        tail = res["output_tail"].strip().splitlines()[-15:]
        print(f"  pytest could not run the file ({how}); the end of its output:")
        print("\n".join(f"    {line}" for line in tail))
    for test, why in res["failed_tests"].items():
        print(f"  failed:  {test}  ({why})")
    for test, why in res["skipped_tests"].items():
        print(f"  skipped: {test}  ({why})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_args(parser, args)
    except SystemExit as exc:  # --help, or a usage error argparse has already reported
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        path = locate_test_file()
    except NotInstalled as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return NOT_INSTALLED
    source = path.read_text()
    try:
        changed = rewritten(source)
    except ValueError as exc:
        print(f"{PROG}: error: {exc} ({path})", file=sys.stderr)
        return 1
    import sklearn

    print(f"scikit-learn {sklearn.__version__}: {path}")
    print(f"{'run':<20} {'passed':>6} {'failed':>6} {'skipped':>7} {'seconds':>8}")
    runs: dict[str, dict[str, Any]] = {}
    if args.baseline:
        runs[BASELINE] = run_copy(source, None, args.timeout)
        _print_run(BASELINE, runs[BASELINE], None)
    for name in args.backends:
        runs[name] = run_copy(changed, name, args.timeout)
        _print_run(f"backprop {name}", runs[name], args.min_passed)
    ok = all(runs[n]["ran"] and runs[n]["passed"] >= args.min_passed for n in args.backends)
    if args.baseline:
        base = set(runs[BASELINE]["passed_tests"])
        for name in args.backends:
            lost = sorted(base - set(runs[name]["passed_tests"]))
            print(f"passed by scikit-learn, not by backprop {name}: {', '.join(lost) if lost else 'none'}")
    if args.json:
        doc = {"command": PROG + "".join(" " + shlex.quote(a) for a in argv), "test_file": str(path),
               "scikit_learn": sklearn.__version__, "min_passed": args.min_passed, "ok": ok, "runs": runs}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
