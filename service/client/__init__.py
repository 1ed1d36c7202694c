"""`python -m service.client`: a command-line client of the /v1 API (httpx, with a tqdm progress bar)."""
