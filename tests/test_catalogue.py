"""Every code a rule or a monitor can raise is in the catalogue (``diag/codes.py``) and in the README's table.

A forgotten catalogue entry used to fail only at run time, when a monitor raised the code: ``code_info`` raised, the
monitor switched itself off mid-fit. This test reads the source instead: every string literal in the code position of
a ``Verdict(...)`` (first argument or ``code=``), of ``report(...)`` / ``_no_verdict(...)`` and of ``code=`` keyword
arguments anywhere in ``diag/`` and ``callbacks/``; a name in that position is followed to the string literals
assigned to it in the same function or at module level (a parameter, an attribute or an item is a code passed through,
checked where it is made), and one that cannot be followed fails the test (use a literal).
"""

from __future__ import annotations

import ast
import pathlib
import re

from diag.codes import CATALOGUE

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Calls whose first positional argument is a finding code.
CODE_FIRST = {"Verdict", "report", "_no_verdict"}
CODE = re.compile(r"^[a-z][a-z0-9_]*$")
# Verdicts that are never reported: the probe's "the learning rate is fine" (published to the other monitors only).
NOT_FINDINGS = {"lr_ok"}


def _literals(node: ast.AST, assigned: dict) -> list:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _literals(node.body, assigned) + _literals(node.orelse, assigned)
    if isinstance(node, ast.Name) and node.id in assigned:
        return [v for value in assigned[node.id] for v in _literals(value, assigned)]
    if isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        return []  # a code passed through (a record's field, a Finding made by a call): checked where it is made
    return [None]  # not a literal we can follow


def _raised_codes(root: pathlib.Path = ROOT):
    found, unresolved = {}, []
    for path in sorted(list((root / "diag").rglob("*.py")) + list((root / "callbacks").rglob("*.py"))):
        tree = ast.parse(path.read_text(), str(path))
        module_level = {t.id: [n.value] for n in tree.body if isinstance(n, ast.Assign)
                        for t in n.targets if isinstance(t, ast.Name)}
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            assigned: dict = dict(module_level)
            parameters = {a.arg for a in func.args.args + func.args.kwonlyargs}
            for node in ast.walk(func):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            assigned.setdefault(target.id, []).append(node.value)
            for node in ast.walk(func):
                if not isinstance(node, ast.Call):
                    continue
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                args = [kw.value for kw in node.keywords if kw.arg == "code"]
                if name in CODE_FIRST and node.args:
                    args.append(node.args[0])
                for arg in args:
                    where = f"{path.relative_to(root)}:{node.lineno}"
                    for value in _literals(arg, assigned):
                        if value is None:
                            if isinstance(arg, ast.Name) and arg.id in parameters:
                                continue  # a code passed through (a parameter): checked where it is made
                            unresolved.append(f"{where}: {ast.unparse(arg)}")
                        elif CODE.match(value):
                            found.setdefault(value, where)
    return found, unresolved


def test_every_code_a_rule_can_raise_is_in_the_catalogue_and_the_readme():
    found, unresolved = _raised_codes()
    assert not unresolved, f"codes that cannot be read from the source (use a string literal): {unresolved}"
    # the scan sees the rules it must see (a scan that finds nothing would pass vacuously)
    assert {"nonfinite_loss", "lr_too_high", "suspected_code_bug", "dead_units", "missing_gradients",
            "train_val_overlap", "overfitting", "probe_skipped", "diag_internal_error"} <= set(found)
    missing = {code: where for code, where in found.items() if code not in CATALOGUE and code not in NOT_FINDINGS}
    assert not missing, f"raised but not in diag/codes.py CATALOGUE: {missing}"
    readme = (ROOT / "README.md").read_text()
    undocumented = sorted(code for code in CATALOGUE if f"| `{code}` |" not in readme)
    assert not undocumented, f"in the catalogue but not in the README's table of finding codes: {undocumented}"


def test_the_scan_catches_a_code_missing_from_the_catalogue(tmp_path):
    """The check itself: a rule that returns a code the catalogue lacks is reported, with its place."""
    rule = tmp_path / "diag" / "detectors"
    rule.mkdir(parents=True)
    (tmp_path / "callbacks").mkdir()
    (rule / "new_rule.py").write_text("def too_few_bananas(n):\n    code = 'too_few_bananas'\n"
                                      "    return Verdict(code, 'Only %d bananas.' % n)\n")
    found, unresolved = _raised_codes(tmp_path)
    assert found == {"too_few_bananas": "diag/detectors/new_rule.py:3"} and not unresolved
    assert "too_few_bananas" not in CATALOGUE
