"""Loading fixtures, rebuilding their weights, and comparing our outputs with the official ones."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.recipe import state_dict_sha256, synth_state_dict

# Where a fresh clone finds the manifests when a fixture has none beside it.
PACKAGED_REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "reference"


@dataclass
class Check:
    name: str
    ok: bool
    max_abs: float
    max_rel: float = 0.0
    why: str = ""


@dataclass
class Fixture:
    path: Path
    data: dict[str, Any]
    # one check per rebuilt state dict: does our sha256 of it equal the fixture's state_dict_sha256?
    digest_checks: list[Check] = field(default_factory=list)

    @property
    def component(self) -> str:
        return self.data["component"]

    @property
    def config(self) -> dict[str, Any]:
        return self.data["config"]

    @property
    def inputs(self) -> dict[str, Any]:
        return self.data["inputs"]

    def input_tensor(self, name: str) -> torch.Tensor:
        """A float input as the reference saw it (fixtures store floats as float16)."""
        x = self.inputs[name]
        return x.float() if x.is_floating_point() else x

    def file(self, name: str) -> Path:
        """A file the fixture names (test videos lie next to the fixture)."""
        return self.path.parent / name

    def manifest(self, name: str) -> dict[str, Any]:
        for folder in (self.path.parent.parent / "manifests", PACKAGED_REFERENCE / "manifests"):
            if (folder / name).is_file():
                return json.loads((folder / name).read_text())
        raise FileNotFoundError(f"manifest {name} not found next to {self.path} nor in {PACKAGED_REFERENCE}")

    def weights(self, component: str | None = None) -> dict[str, torch.Tensor]:
        """The fixture's state dict (recipe + constants); its sha256 is checked in ``digest_checks``.

        ``component`` picks one entry of a pipeline fixture's ``weights.components``.
        """
        spec = self.data["weights"]
        if component is not None:
            spec = spec["components"][component]
        manifest = self.manifest(spec["manifest"])
        sd = synth_state_dict(manifest["keys"], spec["seed"])
        sd.update(spec.get("constants") or {})
        ours, theirs = state_dict_sha256(sd), spec["state_dict_sha256"]
        why = f"sha256 {ours[:16]}..." + ("" if ours == theirs else f", fixture has {theirs[:16]}...")
        name = f"weights {component or spec['manifest']}"
        self.digest_checks.append(Check(name, ours == theirs, 0.0 if ours == theirs else math.inf, why=why))
        return sd


def load_fixture(path: str | Path) -> Fixture:
    path = Path(path)
    return Fixture(path, torch.load(path, map_location="cpu", weights_only=True))


# ---------------------------------------------------------------------------------------------
# comparison (semantics of the shared reference README: summaries, u8 codes +-1, exact ints)


def summarize(x: torch.Tensor) -> dict[str, Any]:
    """Compact statistics of a large tensor, the form the fixtures store them in."""
    x = x.detach().float()
    rows = x.reshape(-1, x.shape[-1])
    idx = torch.tensor(sorted({0, rows.shape[0] // 2, rows.shape[0] - 1}))
    return {
        "shape": list(x.shape),
        "mean_last": x.mean(-1),
        "std_last": x.std(-1, correction=0),
        "mean_lead": rows.mean(0),
        "slice_rows": idx,
        "slices": rows[idx],
        "abs_max": x.abs().max(),
    }


def compare_tensor(name: str, actual: Any, expected: Any, atol: float, rtol: float) -> Check:
    if not isinstance(expected, torch.Tensor):
        ok = abs(actual - expected) <= 1e-9 if isinstance(expected, float) else actual == expected
        return Check(name, bool(ok), 0.0 if ok else math.inf)
    actual = torch.as_tensor(actual).detach().cpu()
    if list(actual.shape) != list(expected.shape):
        return Check(name, False, math.inf, why=f"shape {list(actual.shape)} != {list(expected.shape)}")
    if expected.numel() == 0:
        return Check(name, True, 0.0)
    if not expected.is_floating_point():
        diff = (actual.long() - expected.long()).abs().max().item()
        limit = 1 if expected.dtype == torch.uint8 else 0  # uint8 image codes may round either way
        return Check(name, diff <= limit, float(diff))
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    ok = bool((err <= atol + rtol * e.abs()).all()) and bool(torch.isfinite(a).all())
    return Check(name, ok, err.max().item(), (err / e.abs().clamp_min(1e-12)).max().item())


def compare(actual: Mapping[str, Any], expected: Mapping[str, Any], atol: float, rtol: float) -> list[Check]:
    checks = []
    for name, exp in expected.items():
        if name not in actual:
            checks.append(Check(name, False, math.inf, why="missing"))
        elif isinstance(exp, dict) and exp.get("__summary__"):
            got = actual[name]
            if list(got.shape) != exp["shape"]:
                checks.append(Check(name, False, math.inf, why=f"shape {list(got.shape)} != {exp['shape']}"))
                continue
            parts = [compare_tensor(f, v, exp[f], atol, rtol) for f, v in summarize(got).items() if f != "shape"]
            checks.append(
                Check(
                    name,
                    all(p.ok for p in parts),
                    max(p.max_abs for p in parts),
                    max(p.max_rel for p in parts),
                    why="summary",
                )
            )
        else:
            checks.append(compare_tensor(name, actual[name], exp, atol, rtol))
    return checks


@dataclass
class FixtureReport:
    path: Path
    component: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def format(self) -> str:
        lines = [f"{self.path.name} [{self.component}] {'PASS' if self.ok else 'FAIL'} ({self.seconds:.1f} s)"]
        for c in self.checks:
            extra = f" ({c.why})" if c.why else ""
            verdict = "PASS" if c.ok else "FAIL"
            lines.append(f"  {verdict} {c.name}: max abs {c.max_abs:.3g}, max rel {c.max_rel:.3g}{extra}")
        return "\n".join(lines)


def runner_for(component: str) -> Callable[[Fixture], dict[str, Any]]:
    from model.parity import RUNNERS

    module, func = RUNNERS[component].split(":")
    return getattr(importlib.import_module(module), func)


@torch.inference_mode()
def run_fixture(path: str | Path) -> FixtureReport:
    import time

    fixture = load_fixture(path)
    start = time.perf_counter()
    actual = runner_for(fixture.component)(fixture)
    tol = fixture.data["tolerance"]
    # a digest mismatch fails the fixture: matching outputs from other weights would prove nothing
    checks = fixture.digest_checks + compare(actual, fixture.data["expected"], tol["atol"], tol["rtol"])
    return FixtureReport(fixture.path, fixture.component, checks, time.perf_counter() - start)
