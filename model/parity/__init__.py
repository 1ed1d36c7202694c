"""Parity with the official implementation: run our components on the shared fixtures.

A fixture (``tests/reference/fixtures/*.pt``) holds a component's inputs, the weight recipe and
the outputs the official code produced.  ``RUNNERS`` maps the fixture's ``component`` to the
function that builds our module with those weights and returns outputs named like ``expected``.
"""

from model.parity.harness import FixtureReport, load_fixture, run_fixture

# component -> "module:function"; imported lazily so that one component's deps don't load the rest
RUNNERS = {
    "flow_net": "model.parity.flow:run_flow_net",
    "flow_sampling": "model.parity.flow:run_flow_sampling",
    "vae_decode": "model.parity.decoders:run_vae_decode",
    "vocoder": "model.parity.decoders:run_vocoder",
    "synchformer": "model.parity.features:run_synchformer",
    "clip": "model.parity.features:run_clip",
    "video_frames": "model.parity.video:run_video_frames",
    "pipeline": "model.parity.pipeline:run_pipeline",
}

__all__ = ["RUNNERS", "FixtureReport", "load_fixture", "run_fixture"]
