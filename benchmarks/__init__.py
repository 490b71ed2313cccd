"""Benchmarks of the scan ops and whole models; `timing` holds the shared timing helpers."""
