"""MMAudio inference: our implementation of every stage of the official pipeline."""
