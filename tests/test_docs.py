"""README promises: the test command CI runs, and a settings table in step with the settings object."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "```bash\n./scripts/test\n```" in readme
    assert "exec ./scripts/test" in (ROOT / ".ci" / "run").read_text()


def printed_table(module: str) -> str:
    return subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_readme_lists_every_setting_as_the_settings_object_documents_it() -> None:
    table = printed_table("service.settings")
    assert table.count("| `MMAUDIO_") > 30
    assert table.strip() in (ROOT / "README.md").read_text()


def test_readme_lists_every_problem_type() -> None:
    table = printed_table("service.problems")
    assert table.count("| `urn:mmaudio:problem:") > 20
    assert table.strip() in (ROOT / "README.md").read_text()


WHOLE_PACKAGES = ("parity", "routes")  # described in README as a whole, not file by file


def test_readme_layout_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") : readme.index("## Settings")]
    modules = [
        path
        for package in ("model", "service", "bench")
        for path in (ROOT / package).rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py") and path.parent.name not in WHOLE_PACKAGES
    ]
    missing = [str(p.relative_to(ROOT)) for p in modules if f"{p.name}`" not in layout]
    assert not missing, f"README's layout does not name: {missing}"
