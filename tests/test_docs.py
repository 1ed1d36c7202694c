"""README promises: the test command CI runs, and a settings table in step with the settings object."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "```bash\n./scripts/test\n```" in readme
    assert "exec ./scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_readme_lists_every_setting_as_the_settings_object_documents_it() -> None:
    table = subprocess.run(
        [sys.executable, "-m", "service.settings"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert table.count("| `MMAUDIO_") > 30
    assert table.strip() in (ROOT / "README.md").read_text()
