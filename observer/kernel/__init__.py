"""Readers of kernel facts: one small module per source, each taking a ``root`` so tests can point
it at a captured fixture tree (``tests/fixtures/<name>/proc/...``) instead of the live system."""
