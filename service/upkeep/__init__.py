"""Periodic upkeep that every API process runs in a background thread: abandoned jobs, webhooks, expired files."""
