"""The evaluation jobs' command line, built on ``dit_gspn.metrics`` (the library: import from there):
``python -m evaluation`` (ADM's FID, sFID, Inception Score, precision and recall, and KID, between samples and a
reference) and ``python -m evaluation.reference`` (a reference's statistics from a folder of images)."""
