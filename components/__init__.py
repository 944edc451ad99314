"""Pipeline components: one module per DVC stage (`python -m components.<step>`)."""
