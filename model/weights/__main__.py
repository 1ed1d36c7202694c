"""python -m model.weights list|verify|download (see model.weights.downloader)."""

import sys

from model.weights.downloader import main

sys.exit(main())
