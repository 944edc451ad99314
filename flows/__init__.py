"""Prefect flows: `train` (the DVC pipeline, tracked and gated) and `retrain` (new S3 data)."""
