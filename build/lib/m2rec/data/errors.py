"""Kept for existing imports: the error classes live in m2rec.errors."""

from m2rec.errors import DataError  # noqa: F401
