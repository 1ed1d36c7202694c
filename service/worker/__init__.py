"""The GPU worker: loads the pipeline once and runs batches of queued jobs in its own process."""
