"""The GPU worker: an RQ worker that loads the pipeline once and runs every job in its own process."""
