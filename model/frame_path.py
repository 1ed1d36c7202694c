"""How video frames are resized for the model, a choice both the model code and the settings name (kept in a
module of its own so that reading settings does not import torch)."""

from typing import Literal

# exact: the official frames (torch resizing); fast: libswscale, several times cheaper, a few uint8 codes off
FramePath = Literal["exact", "fast"]
