"""Evaluation: metrics (docs/METHOD.md §6), prompt protocols, the promotion gate, and the report."""
