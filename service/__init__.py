"""The MMAudio HTTP service: FastAPI front, Redis/RQ queue, long-lived workers holding the pipeline."""
