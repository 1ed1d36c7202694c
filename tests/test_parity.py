"""Every shared parity fixture must pass at its tolerance (the official outputs for the same weights)."""

from pathlib import Path

import pytest
import torch

from model.parity import run_fixture
from model.recipe import Manifest, synth_state_dict

FIXTURES = sorted((Path(__file__).parent / "reference" / "fixtures").glob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_matches_official_outputs(path: Path) -> None:
    report = run_fixture(path)
    assert report.ok, report.format()


def test_a_weights_digest_mismatch_fails_the_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    from model.parity import harness

    def perturbed(manifest: Manifest, seed: int) -> dict[str, torch.Tensor]:
        """The recipe's weights with one value changed."""
        sd = synth_state_dict(manifest, seed)
        first = sorted(sd)[0]
        sd[first] = sd[first].clone().reshape(-1).index_add_(0, torch.tensor([0]), torch.ones(1)).view_as(sd[first])
        return sd

    monkeypatch.setattr(harness, "synth_state_dict", perturbed)
    report = run_fixture(Path(__file__).parent / "reference" / "fixtures" / "vae_decode__16k.pt")
    digest = next(c for c in report.checks if c.name.startswith("weights "))
    assert not digest.ok and not report.ok, report.format()
