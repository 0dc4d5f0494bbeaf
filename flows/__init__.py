"""Prefect flows of the knowledge-refresh pipeline."""
