"""Data-quality gates run before a model is edited (Great Expectations 1.x)."""
from data_checks.edit_requests import (
    CHECKS,
    CheckLimits,
    CheckReport,
    build_suite,
    requests_frame,
    split_valid,
    validate_requests,
)

__all__ = [
    "CHECKS",
    "CheckLimits",
    "CheckReport",
    "build_suite",
    "requests_frame",
    "split_valid",
    "validate_requests",
]
