"""Every shared parity fixture must pass at its tolerance (the official outputs for the same weights)."""

from pathlib import Path

import pytest

from model.parity import run_fixture

FIXTURES = sorted((Path(__file__).parent / "reference" / "fixtures").glob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_matches_official_outputs(path: Path) -> None:
    report = run_fixture(path)
    assert report.ok, report.format()
