"""The manifest's `tracking:` section (W&B, MLflow, TensorBoard), which refuses credentials in the file (pure)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from dbbatch.config.manifest_errors import short
from dbbatch.config.settings import Strict

# Keys people put in a tracking section for credentials: refused with where the credential goes instead.
_CREDENTIAL_KEYS = {"wandb": ("api_key", "key", "token", "password"),
                    "mlflow": ("username", "password", "token", "api_key", "key")}
_CREDENTIAL_ENV = {"wandb": "WANDB_API_KEY", "mlflow": "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"}


def _no_credentials(backend: str, data: Any) -> Any:
    if isinstance(data, dict):
        for key in _CREDENTIAL_KEYS[backend]:
            if key in data:
                raise ValueError(f"{key}: credentials never go in the manifest (it is committed, shared and embedded in Job specs); "
                                 f"set {_CREDENTIAL_ENV[backend]} in the environment")
    return data


class WandbTracking(Strict):
    """Weights & Biases (pip install 'dbbatch[wandb]'); the API key comes from WANDB_API_KEY."""

    project: str = Field(min_length=1, max_length=128, description="W&B project: one run per subject in it.")
    entity: Optional[str] = Field(None, description="W&B team or user (null: the API key's default entity).")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="online: stream to W&B; offline: write run files only (`wandb sync` uploads them later); "
        "disabled: no run.")
    tags: list[str] = Field(default_factory=list, description="Tags on every run (dbbatch adds the batch's run id).")
    dir: Optional[str] = Field(None, description="Local folder for W&B's run files, relative to the manifest's folder "
                               "(null: $WANDB_DIR, else <work-dir>/wandb; offline runs stay there for `wandb sync`).")


    @field_validator("project", "entity")
    @classmethod
    def _w_and_b_name(cls, v: Optional[str]) -> Optional[str]:
        bad = next((c for c in "/\\#?%:" if v is not None and c in v), None)
        if bad is not None:
            raise ValueError(f"{v!r} contains {bad!r}; W&B names cannot contain / \\ # ? % or :")
        return v


class MlflowTracking(Strict):
    """MLflow (pip install 'dbbatch[mlflow]'); credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN."""

    tracking_uri: Optional[str] = Field(
        None, description="An MLflow tracking server (http(s)://host:port) or store URI (sqlite:///path/mlflow.db). "
        "null: $MLFLOW_TRACKING_URI if set, else a local SQLite store beside the output (<output>/_mlflow/mlflow.db for a local output, else "
        "<work-dir>/mlflow/mlflow.db). No credentials in it.")
    experiment: str = Field(min_length=1, max_length=256, description="MLflow experiment: one run per subject in it.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_userinfo(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.username or parts.password:
            raise ValueError("has a user name or password in it; credentials never go in the manifest: set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
                             "environment and give the URI without them")
        if parts.scheme not in ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks"):
            raise ValueError(f"{short(v)} is not an MLflow tracking URI; use http(s)://host:port for a server or "
                             "sqlite:///path/mlflow.db for a local store")
        return v


class TrackingConfig(Strict):
    """Where each subject's training is tracked: TensorBoard files beside its outputs, W&B and MLflow runs."""

    tensorboard: bool = Field(True, description="Write TensorBoard event files (uploaded to <output>/<id>/logs/).")
    wandb: Optional[WandbTracking] = Field(None, description="One W&B run per subject (README: Tracking).")
    mlflow: Optional[MlflowTracking] = Field(None, description="One MLflow run per subject (README: Tracking).")

    @field_validator("wandb", "mlflow", mode="before")
    @classmethod
    def _credentials_from_environment(cls, v: Any, info: Any) -> Any:
        return _no_credentials(info.field_name, v)

    def backends(self) -> list[str]:
        """The tracking services asked for (not counting TensorBoard or W&B mode disabled)."""
        return [name for name in ("wandb", "mlflow") if getattr(self, name) is not None
                and not (name == "wandb" and self.wandb.mode == "disabled")]
