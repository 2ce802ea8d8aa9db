"""The README's examples are each run by a test exactly as written: every one the README
shows (:func:`vfio_ep_cli.readme_examples`) is passed to ``readme_example`` by some test,
which checks it is still in the README and runs it (adding only a run directory)."""

from __future__ import annotations

import ast
from pathlib import Path

from vfio_ep_cli import readme_examples

TESTS = Path(__file__).resolve().parent


def _examples_run_by_tests() -> set[str]:
    found = set()
    for path in TESTS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "readme_example" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                found.add(node.args[0].value)
    return found


def test_every_readme_example_is_run_by_a_test() -> None:
    examples = readme_examples()
    assert len(examples) >= 10  # the extraction still finds them
    missing = [e for e in examples if e not in _examples_run_by_tests()]
    assert not missing, f"README examples no test runs: {missing}"
