"""House rules the test suite keeps, checked on its own source (ast, no imports of the tests).

Rule: no test compares a measured duration or rate against a threshold. Such a check measures the
machine, not the code: it fails on a loaded machine (this one has 2 cores shared by everyone) and
passes on a broken one that happens to be quick. Use events and conditions instead; a generous bound
that only catches a hang is fine when its line says so with a `# hang bound` comment.

What counts as a measured duration or rate (`measured`):
- a difference involving a clock read: time.monotonic(), time.perf_counter(), time.time() (and their
  _ns forms) or an event loop's .time();
- a name, attribute or string subscript key that names one: ending in `_s`, `seconds`, `elapsed`,
  `latency`, `duration`, `rate` or `per_s` (e.g. `elapsed`, `m["ttft_mean_s"]`, `stats.step_s`);
- a local name assigned from a clock difference (`took = time.perf_counter() - t0`).
A threshold is a number or arithmetic of numbers (`2.0`, `3 * 0.05`), or a measured value scaled by
one (`0.5 * end`: a ratio); comparing against 0 is a sign check, not a threshold. Only <, <=, >, >=
count (pytest.approx equality states a computed value).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
MARK = "# hang bound"
CLOCKS = {"monotonic", "perf_counter", "time", "monotonic_ns", "perf_counter_ns", "time_ns"}
MEASURED_NAME = re.compile(r"(_s|seconds|elapsed|latency|duration|rate|per_s)$", re.IGNORECASE)
ORDER = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)

# Files that still break the rule, with how many violations each holds (a new one, or a fixed one,
# fails this test, so the list never goes stale silently). Empty: keep it so. Durations kept in
# dicts count too when their keys name them (`c["hidden_s"]`); tests/moemesh/mesh/test_gloo.py
# names its measured times that way and compares none with a threshold.
ALLOWED: dict[str, int] = {}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    source: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source}"


def _is_clock_read(node: ast.AST) -> bool:
    """time.monotonic() / perf_counter() / time() / loop.time(), called without arguments."""
    if not isinstance(node, ast.Call) or node.args or node.keywords:
        return False
    func = node.func
    return ((isinstance(func, ast.Attribute) and func.attr in CLOCKS)
            or (isinstance(func, ast.Name) and func.id in CLOCKS))


def _is_clock_difference(node: ast.AST, stamps: frozenset[str] = frozenset()) -> bool:
    """A subtraction involving a clock read or a clock stamp (a name assigned from a clock read)."""
    return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub)
               and any(_is_clock_read(m) or (isinstance(m, ast.Name) and m.id in stamps) for m in ast.walk(n))
               for n in ast.walk(node))


def _named(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    if isinstance(node, ast.Call):  # stats.elapsed(), len(x) is not: only a method named like a measure
        return _named(node.func) if isinstance(node.func, ast.Attribute) else None
    return None


ARITHMETIC = {ast.Add: float.__add__, ast.Sub: float.__sub__, ast.Mult: float.__mul__, ast.Div: float.__truediv__}


def _threshold(node: ast.AST) -> float | None:
    """The value of a number or arithmetic of numbers (+ - * /, unary minus), else None."""
    if isinstance(node, ast.Constant):
        value = node.value
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _threshold(node.operand)
        return None if value is None else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        left, right = _threshold(node.left), _threshold(node.right)
        if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
            return None
        return ARITHMETIC[type(node.op)](left, right)
    return None


def _assignments(tree: ast.AST):
    """(target name, value) pairs of every assignment, tuples unpacked element by element."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    yield target.id, node.value
                elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple) \
                        and len(target.elts) == len(node.value.elts):
                    yield from ((t.id, v) for t, v in zip(target.elts, node.value.elts) if isinstance(t, ast.Name))


@dataclass(frozen=True)
class Clocks:
    """Of one module: clock stamps (`t0 = time.monotonic()`) and names assigned from a clock
    difference (`took = time.perf_counter() - t0`), wherever they are assigned."""

    stamps: frozenset[str]
    measured: frozenset[str]

    @staticmethod
    def of(tree: ast.AST) -> Clocks:
        pairs = list(_assignments(tree))
        stamps = frozenset(name for name, value in pairs if any(_is_clock_read(n) for n in ast.walk(value)))
        return Clocks(stamps, frozenset(name for name, value in pairs if _is_clock_difference(value, stamps)))


def _measured(node: ast.AST, clocks: Clocks) -> bool:
    if _is_clock_difference(node, clocks.stamps):
        return True
    name = _named(node)
    return name is not None and (name in clocks.measured or bool(MEASURED_NAME.search(name)))


def violations(source: str, path: str = "<snippet>") -> list[Violation]:
    """Every ordered comparison of a measured duration or rate with a literal threshold in
    `source`, except on statements carrying the `# hang bound` mark."""
    tree = ast.parse(source)
    lines = source.splitlines()
    clocks = Clocks.of(tree)
    marked: set[int] = set()
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.stmt) and not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                                 ast.With, ast.AsyncWith, ast.For, ast.While, ast.If,
                                                                 ast.Try)):
            span = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
            if any(MARK in lines[i - 1] for i in span):
                marked.update(span)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare) or node.lineno in marked:
            continue
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:]):
            if not isinstance(op, ORDER):
                continue
            for a, b in ((left, right), (right, left)):
                limit = _threshold(b)
                if limit is None and isinstance(b, ast.BinOp) and isinstance(b.op, ast.Mult):  # 0.5 * end
                    factors = [(_threshold(x), y) for x, y in ((b.left, b.right), (b.right, b.left))]
                    limit = next((f for f, y in factors  # a factor of 1 +- 1e-3 is a float tolerance
                                  if f is not None and abs(f - 1) > 1e-3 and _measured(y, clocks)), None)
                if limit is not None and limit != 0 and _measured(a, clocks):
                    found.append(Violation(path, node.lineno, ast.get_source_segment(source, node) or ""))
                    break
    return found


def scan_tests() -> dict[str, list[Violation]]:
    out: dict[str, list[Violation]] = {}
    for file in sorted(TESTS.rglob("*.py")):
        rel = file.relative_to(ROOT).as_posix()
        found = violations(file.read_text(), rel)
        if found:
            out[rel] = found
    return out


def test_no_test_compares_a_measured_duration_with_a_threshold():
    found = scan_tests()
    unexpected = {p: v for p, v in found.items() if len(v) != ALLOWED.get(p, 0)}
    stale = {p: n for p, n in ALLOWED.items() if p not in found}
    report = "\n".join(str(v) for vs in unexpected.values() for v in vs)
    assert not unexpected, (f"timing thresholds in tests (use events/conditions, or mark a generous hang bound "
                            f"with `{MARK}`; allowed counts: {ALLOWED}):\n{report}")
    assert not stale, f"fixed, so take them off ALLOWED: {stale}"


# ---- the checker itself ------------------------------------------------------------------------
def test_catches_clock_differences_and_measured_names():
    snippet = '''
import time
t0 = time.perf_counter()
took = time.perf_counter() - t0
assert time.monotonic() - t0 < 2.0
assert took < 0.5
assert elapsed <= 3 * 0.1
assert m["ttft_mean_s"] < 0.05
assert stats.tokens_per_s > 100
assert (1.0) > result.step_seconds
assert 0 < latency < 2.0
assert loop.time() - start >= 0.2
start = time.monotonic()
first, end = stamps[0] - start, stamps[-1] - start
assert first < 0.5 * end
assert stamps[-1] - start < 2
'''
    lines = [v.line for v in violations(snippet)]
    assert lines == [5, 6, 7, 8, 9, 10, 11, 12, 15, 16]


def test_hang_bounds_sign_checks_and_computed_values_pass():
    snippet = '''
import time
took = time.perf_counter() - t0
assert took < 60.0  # hang bound
assert (elapsed  # the watch ended
        < 30.0)  # hang bound
assert m["tpot_mean_s"] > 0 and latency >= 0
assert m["output_tokens_per_s"] == pytest.approx(4.0)
assert wall >= 3 * (0.02 + 4 * 0.01)
assert t.token_times[i] >= 0.02 + i * 0.01
assert cost.layer_s[0] == 5.56 and len(rates) > 3
assert first <= 15 and ours[0] > 1.6
deadline = time.monotonic() + 5
while time.monotonic() < deadline and not done():
    pass
assert new.exchange_seconds > old.exchange_seconds and 0 <= hidden_s <= exchange_s
assert rss - base > 0.6 * (total - expert_bytes)
assert ours.max_link_s <= rr.max_link_s * (1 + 1e-9)
'''
    assert violations(snippet) == []
