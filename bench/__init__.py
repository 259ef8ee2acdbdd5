"""Benchmarks: each script measures the project against its baseline in the same run."""
