"""Read the kselftest harness's TAP 13 and report it: a summary table, TAP, JUnit XML and JSON.

A test the plan announced but the stream never reported (the guest died mid-run, or the
suite said "Bail out!") counts as an error, so a truncated run can never look green.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

_RESULT = re.compile(r"(not ok|ok) (\d+)(?: ([^#].*?))?(?:\s+#\s*(.*))?$")
_DIRECTIVE = re.compile(r"(SKIP|XFAIL|XPASS|error)\b\s*(.*)", re.IGNORECASE)
_PLAN = re.compile(r"1\.\.(\d+)")
_TOTALS = re.compile(r"# Totals: (.*)")
_BAIL_OUT = re.compile(r"Bail out!.*")
_RUN = re.compile(r"#\s+RUN\s")
_HARNESS_STATUS = re.compile(r"#\s+(OK|FAIL|SKIP|XFAIL|XPASS)\s")
# What a suite measured, for the test it prints before: "# metrics: rtt_avg_ms=2.1 ..."
_METRICS = re.compile(r"# metrics:((?:\s+\w+=-?[\d.]+)+)\s*$")
# Transfer tests and the bytes a pass of one moved: the kselftest's READ/WRITE/COPY_TEST
# each move its test_size[] (1, 1024, 1025, 1024000, 1024001 bytes), a pcitest case the size
# in its name.
_KSELFTEST_TRANSFER = re.compile(r"pci_ep_data_transfer\.\w+\.(READ|WRITE|COPY)_TEST")
_PCITEST_TRANSFER = re.compile(r"pcitest\.(?:READ|WRITE|COPY)_(\d+)(?:_DMA)?")
KSELFTEST_TRANSFER_BYTES = 1 + 1024 + 1025 + 1024000 + 1024001
FAILING = ("fail", "xpass", "error")


@dataclass
class TestCase:
    """One reported test: status is pass, fail, skip, xfail, xpass or error."""

    number: int
    name: str
    status: str
    reason: str = ""
    diagnostics: list[str] = field(default_factory=list)
    seconds: float | None = None  # from its start (RUN line, or the previous result) to its result
    # What it measured (a ping's round trips, ntb_perf's and a transfer's throughput), by name
    # with its unit: rtt_avg_ms, mbytes_s.
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status in FAILING


@dataclass
class Report:
    """A parsed TAP stream."""

    tests: list[TestCase]
    planned: int | None
    totals: dict[str, int] | None
    tap: str

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("pass", "fail", "skip", "xfail", "xpass", "error"), 0)
        for test in self.tests:
            counts[test.status] += 1
        return counts

    @property
    def ran_nothing(self) -> bool:
        """No test reported: a selection that matched nothing proves nothing."""
        return not self.tests

    @property
    def passed(self) -> bool:
        """Something ran, no test failed, none went missing, and the harness's totals agree."""
        totals_bad = self.totals is not None and any(self.totals.get(k, 0) for k in FAILING)
        return (not self.ran_nothing and not totals_bad
                and not any(test.failed for test in self.tests))


def parse_tap(text: str, line_times: list[tuple[float, str]] | None = None) -> Report:
    """Parse kselftest TAP; diagnostics between ``#  RUN`` and a result belong to that test.

    ``line_times`` (when each line of ``text`` reached the host, in order) time the tests:
    from a test's ``#  RUN`` line, or else from the line after the previous result, to its
    own result line."""
    tests: list[TestCase] = []
    planned = totals = None
    pending: list[str] | None = None
    metrics: dict[str, float] = {}
    clock = _LineClock(line_times)
    for line in text.splitlines():
        when = clock.at(line)
        if match := _RESULT.match(line):
            test = replace(_test_case(match, pending or []), seconds=clock.since(when))
            tests.append(replace(test, metrics=metrics | _transfer_metrics(test)))
            pending = None
            metrics = {}
            clock.start = None
        elif match := _METRICS.match(line):
            metrics |= {k: float(v) for k, v in re.findall(r"(\w+)=(-?[\d.]+)", match[1])}
        elif match := _PLAN.match(line):
            planned = int(match.group(1))
        elif match := _TOTALS.match(line):
            totals = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", match[1])}
        elif _RUN.match(line):
            pending = []
            clock.start = when
        elif pending is not None and line.startswith("#") and not _HARNESS_STATUS.match(line):
            pending.append(line[1:].strip())
    bailed = _BAIL_OUT.search(text)
    return Report(tests + _missing(tests, planned, bailed[0] if bailed else None), planned,
                  totals, text)


class _LineClock:
    """Arrival times of a text's lines, looked up in order (lines the times do not have, e.g.
    a console's own, get none)."""

    def __init__(self, line_times: list[tuple[float, str]] | None) -> None:
        self.times = list(reversed(line_times or []))
        self.start: float | None = None  # the current test's RUN line
        self.last: float | None = None  # the last result (at first: the first line)

    def at(self, line: str) -> float | None:
        while self.times:
            when, text = self.times.pop()
            if text.rstrip() == line.rstrip():
                if self.last is None:
                    self.last = when
                return when
        return None

    def since(self, end: float | None) -> float | None:
        """Seconds from the test's start to ``end``, its result line; the next test's
        start, unless it has a RUN line of its own, is this result."""
        begin = self.start if self.start is not None else self.last
        if end is not None:
            self.last = end
        return None if end is None or begin is None else max(end - begin, 0.0)


def _transfer_metrics(test: TestCase) -> dict[str, float]:
    """A passing transfer test's bytes and throughput over its time: the guest's whole
    test (its buffers' CRC32 under TCG, every command's fixed cost), for comparing runs;
    ``make bench`` measures the endpoint's data path alone."""
    if test.status != "pass" or not test.seconds:
        return {}
    if _KSELFTEST_TRANSFER.fullmatch(test.name):
        moved = KSELFTEST_TRANSFER_BYTES
    elif match := _PCITEST_TRANSFER.fullmatch(test.name):
        moved = int(match[1])
    else:
        return {}
    return {"bytes": moved, "mbytes_s": round(moved / test.seconds / 1e6, 3)}


def _test_case(match: re.Match[str], diagnostics: list[str]) -> TestCase:
    verdict, number, name, comment = match.groups()
    directive = _DIRECTIVE.match(comment or "")
    if directive:
        status, reason = directive.group(1).lower(), directive.group(2)
    else:
        status, reason = ("pass" if verdict == "ok" else "fail"), (comment or "").strip()
    return TestCase(int(number), name or f"test {number}", status, reason, diagnostics)


def _missing(tests: list[TestCase], planned: int | None, bailed: str | None) -> list[TestCase]:
    """The planned tests the stream never reported, each an error: not run after the
    suite's ``bailed`` line, if it has one."""
    seen = {test.number for test in tests}
    why = f"not run: {bailed}" if bailed else "planned but never reported"
    return [TestCase(n, f"test {n}", "error", why)
            for n in range(1, (planned or 0) + 1) if n not in seen]


def expect_failures(report: Report, names: tuple[str, ...]) -> Report:
    """Known upstream behaviour: a failure of a test in ``names`` becomes xfail, a pass of
    one xpass (which fails the run: the expectation is stale)."""
    if not names:
        return report
    moved = {"fail": ("xfail", "failed, as expected"),
             "pass": ("xpass", "expected to fail, but passed")}
    tests = [replace(t, status=moved[t.status][0], reason=t.reason or moved[t.status][1])
             if t.name in names and t.status in moved else t for t in report.tests]
    # the harness's own totals count an expected failure as a failure: they no longer apply
    return replace(report, tests=tests, totals=None if tests != report.tests else report.totals)


def load_results(run_dir: Path) -> tuple[Report, dict[str, Any] | None]:
    """The report and endpoint facts a run wrote (results.json, results.tap) in ``run_dir``."""
    data = json.loads((run_dir / "results.json").read_text())
    tap = run_dir / "results.tap"
    report = Report([TestCase(**t) for t in data["tests"]], data["planned"], data["totals"],
                    tap.read_text() if tap.exists() else "")
    return report, data.get("endpoint")


def merge_reports(reports: list[Report]) -> Report:
    """Several TAP streams (one per guest) as one report, tests numbered in order."""
    tests: list[TestCase] = []
    for report in reports:
        tests += [replace(t, number=len(tests) + i) for i, t in enumerate(report.tests, 1)]
    planned = sum(r.planned or len(r.tests) for r in reports)
    return Report(tests, planned, None, "".join(r.tap for r in reports))


def summary_table(report: Report) -> str:
    """A table of every test and its first diagnostic, then the counts."""
    if report.ran_nothing:
        return "no test ran" + (" (plan: 0)" if report.planned == 0 else
                                " (no TAP results in the guest's output)")
    width = max(len(test.name) for test in report.tests)
    lines = [f"{'#':>3}  {'result':<6}  {'test':<{width}}  detail"]
    for test in report.tests:
        detail = test.reason or (test.diagnostics[0] if test.failed and test.diagnostics else "")
        lines.append(f"{test.number:>3}  {test.status.upper():<6}  {test.name:<{width}}  "
                     f"{detail}".rstrip())
    counts = report.counts()
    summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    lines.append(f"{len(report.tests)} tests: {summary}"
                 + (f" (plan: {report.planned})" if report.planned is not None else ""))
    if measured := metrics_table([("this run", report)]):
        lines += ["", measured]
    return "\n".join(lines)


def metrics_table(columns: list[tuple[str, Report]]) -> str:
    """What the tests measured, a row per test and measure, a column per run (a matrix's
    cells side by side); empty when nothing was measured."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for column, report in columns:
        for test in report.tests:
            for measure, value in test.metrics.items():
                rows.setdefault((test.name, measure), {})[column] = value
    if not rows:
        return ""
    names = [column for column, _ in columns]
    lines = [f"| test | measure | {' | '.join(names)} |",
             f"|---|---|{'---:|' * len(names)}"]
    for (name, measure), values in rows.items():
        shown = (_shown(values[n]) if n in values else "" for n in names)
        lines.append(f"| {name} | {measure} | {' | '.join(shown)} |")
    return "\n".join(lines)


def _shown(value: object) -> str:
    """A property or a measure as written: whole numbers without a fraction, others to a
    thousandth."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if value.is_integer() else f"{value:.3f}".rstrip("0")


def write_results(report: Report, run_dir: Path, *, exit_status: int | None,
                  error: str | None, suite: str, endpoint: dict[str, Any] | None = None) -> None:
    """results.tap, results.xml (JUnit, test suite ``suite``) and results.json in ``run_dir``;
    ``endpoint`` (what was tested: function, controller profile, doorbell, kernel) goes into
    the JSON and the JUnit suite's properties."""
    (run_dir / "results.tap").write_text(report.tap)
    ET.ElementTree(_junit(report, suite, endpoint or {})).write(
        run_dir / "results.xml", encoding="utf-8", xml_declaration=True)
    summary = {
        "endpoint": endpoint,
        "passed": report.passed and exit_status == 0,
        "exit_status": exit_status,
        "error": error,
        "planned": report.planned,
        "counts": report.counts(),
        "totals": report.totals,
        "tests": [asdict(test) for test in report.tests],
    }
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")


def write_junit(suites: list[tuple[str, Report, dict[str, Any] | None]], path: Path) -> None:
    """One JUnit file of several runs (a ``--matrix``): a test suite per (name, report,
    endpoint)."""
    root = ET.Element("testsuites", _junit_counts("vfio-ep", [r for _, r, _ in suites]))
    for name, report, endpoint in suites:
        _junit_suite(root, report, name, endpoint or {})
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _junit_counts(name: str, reports: list[Report]) -> dict[str, str]:
    counts = dict.fromkeys(("fail", "xpass", "error", "skip", "xfail"), 0)
    for report in reports:
        for key, n in report.counts().items():
            if key in counts:
                counts[key] += n
    return {"name": name, "tests": str(sum(len(r.tests) for r in reports)),
            "failures": str(counts["fail"] + counts["xpass"]), "errors": str(counts["error"]),
            "skipped": str(counts["skip"] + counts["xfail"])}


def _junit(report: Report, suite_name: str, endpoint: dict[str, Any]) -> ET.Element:
    suites = ET.Element("testsuites", _junit_counts(suite_name, [report]))
    _junit_suite(suites, report, suite_name, endpoint)
    return suites


def _junit_properties(parent: ET.Element, values: dict[str, Any]) -> None:
    """<properties> of a test suite (what it tested) or a test case (what it measured)."""
    if values:
        props = ET.SubElement(parent, "properties")
        for key, value in values.items():
            ET.SubElement(props, "property", {"name": key, "value": _shown(value)})


def _junit_suite(parent: ET.Element, report: Report, suite_name: str,
                 endpoint: dict[str, Any]) -> None:
    suite = ET.SubElement(parent, "testsuite", _junit_counts(suite_name, [report]))
    _junit_properties(suite, endpoint)
    for test in report.tests:
        classname, _, name = test.name.rpartition(".")
        case = ET.SubElement(suite, "testcase", {"classname": classname or suite_name,
                                                 "name": name})
        if test.seconds is not None:
            case.set("time", f"{test.seconds:.3f}")
        _junit_properties(case, test.metrics)
        tag = {"fail": "failure", "xpass": "failure", "error": "error", "skip": "skipped",
               "xfail": "skipped"}.get(test.status)
        if tag:
            ET.SubElement(case, tag, {"message": test.reason or test.status}).text = (
                "\n".join(test.diagnostics))
    ET.SubElement(suite, "system-out").text = report.tap
