"""Print each notebook's runtime under ``pytest --nbval`` (the sum of its cells' times),
so that the runtimes the chapters state can be checked against every run."""

from collections import defaultdict

notebook_seconds = defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        notebook_seconds[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if notebook_seconds:
        terminalreporter.section("notebook runtimes")
        for path, seconds in sorted(notebook_seconds.items()):
            terminalreporter.write_line(f"{seconds:7.1f} s  {path}")
