"""The README's first two commands are the set-up a new user runs, and CI runs the second one."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [l for l in block.splitlines() if l.strip() and not l.startswith("#")]


def test_first_command_runs_the_main_job_and_second_the_tests():
    main, tests = readme_commands()[:2]
    assert main.endswith("slmfed simulate") and "-c .ci/constraints.txt" in main
    assert "pytest" in tests and "-c .ci/constraints.txt" in tests


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
