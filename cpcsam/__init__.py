"""CPC-SAM: causal prompt calibration for the Segment Anything Model.

The library is pure Python + torch. Orchestration (DVC, MLflow, Prefect) lives in
`components/` and `flows/`, never here.
"""

__version__ = "0.1.0"
