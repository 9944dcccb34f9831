"""MLflow tracking: run logging for the engine (runs.py), trained models and the registry (models.py)."""

from cellseg.tracking.runs import MlflowCallback, check_tracking_uri, registered_name, resolve_tracking_uri

__all__ = ["MlflowCallback", "check_tracking_uri", "registered_name", "resolve_tracking_uri"]
