"""Operations: MLflow tracking, lineage, preflight checks and the model registry (outside the library)."""
