"""Prefect tasks: thin wrappers over ``kdpo`` and ``data_checks`` that also log to MLflow."""
