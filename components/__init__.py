"""Pipeline components: one module per step, `python -m components.<step>`."""
