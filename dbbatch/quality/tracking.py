"""Experiment tracking: each subject one run in Weights & Biases and/or MLflow, beside its TensorBoard log.

The runs are Lightning's own loggers (`WandbLogger`, `MLFlowLogger`, optional extras), each wrapped in a
`Guarded` logger that a tracking service can never fail: the first error is one warning, the service is
dropped for that subject, and training (and the TensorBoard log, which is not guarded) goes on.

A subject's run ids live in its resumable state in the output store (`<output>/<id>/_tracking.json`, ids only,
written as soon as the run exists), so a resumed or republished subject continues its run on any machine.
A run carries the subject's resolved settings (hyperparameters), loss and LR per step (live, through the
Trainer), the evaluation points (at their steps, when training ends), the sample grid and the output URL.
In a packed cohort every member has its own runs: `Guarded` routes `loss/<member>` to that member's `loss`.

Credentials come only from the environment the services read (WANDB_API_KEY, MLFLOW_TRACKING_*); nothing here
writes one.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only

from dbbatch.core.errors import StorageError
from dbbatch.store.fingerprints import flatten

log = logging.getLogger(__name__)

TRACKING_FILE = "_tracking.json"
# MLflow retries an unreachable server for minutes by default; a tracking service must not hold training up.
MLFLOW_PATIENCE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def mlflow_uri(cfg: Any, output: str, work_dir: Path) -> str:
    """tracking.mlflow.tracking_uri, or the local SQLite store beside the output (in the work dir for a remote one)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow's own convention, e.g. set by the platform for every job
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(output) / "_mlflow" if "://" not in output else work_dir / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / 'mlflow.db'}"


def hyperparameters(subject: Any, context: "Context") -> dict[str, Any]:
    """The subject's resolved settings as a run's hyperparameters: every text with user:password@ removed (a photo
    URL, an evaluation model's), as in config.yaml."""
    from dbbatch.store.locations import redact

    def scrub(v: Any) -> Any:
        return {k: scrub(x) for k, x in v.items()} if isinstance(v, dict) else [scrub(x) for x in v] \
            if isinstance(v, list) else redact(v) if isinstance(v, str) else v

    settings = subject.model_dump(mode="json", exclude={"settings_from", "index"})
    return scrub({"subject": settings, "base_model": context.base_model, "output": context.output_shown})


@dataclass
class Context:
    """What every run of a batch shares."""

    batch_run_id: str
    base_model: str
    output: str  # the output location (for the local MLflow store)
    output_shown: str  # redacted, as runs show it
    work_dir: Path
    base_dir: Optional[Path] = None  # the manifest's folder: a relative tracking.wandb.dir is inside it


class Guarded(Logger):
    """A Lightning logger that cannot fail training: the first exception of `inner` is one warning (through
    `on_failure`) and the logger goes quiet. With `member`, it is one packed subject's view of its cohort's
    metrics: `<name>/<member>` arrives as `<name>`, another member's `<name>/<other>` is dropped."""

    def __init__(self, service: str, inner: Logger, on_failure: Callable[[str, BaseException], None],
                 member: Optional[str] = None, members: tuple[str, ...] = ()):
        super().__init__()
        self.service, self.inner, self.on_failure = service, inner, on_failure
        self.member, self.members = member, members
        self.failed = False

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.failed:
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any failure of a tracking service is the same to training
            self.failed = True
            self.on_failure(f"{what}", e)
            return None

    def route(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.member is None:
            return dict(metrics)
        out = {}
        for key, value in metrics.items():
            head, _, tail = key.rpartition("/")
            if head and tail in self.members:
                if tail == self.member:
                    out[head] = value
            else:
                out[key] = value
        return out

    @property
    def name(self) -> Optional[str]:
        return self.service

    @property
    def version(self) -> Optional[str]:
        return None

    @property
    def save_dir(self) -> Optional[str]:
        return None

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        routed = self.route(metrics)
        if routed:
            self.call("logging metrics", lambda: self.inner.log_metrics(routed, step))

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's own call (the module's hparams, none here) is ignored: `SubjectRuns.open` logs the settings."""

    @rank_zero_only
    def save(self) -> None:
        self.call("saving", self.inner.save)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Lightning's end of fit: the run stays open for the samples; `SubjectRuns.close` ends it."""
        self.call("saving", self.inner.save)


class SubjectRuns:
    """One subject's tracking runs (zero, one or two), opened with the ids its resumable state keeps."""

    def __init__(self, tracking: Any, subject: Any, out: str, storage: Any, context: Context,
                 guard: Optional[Callable[[str], None]] = None):
        self.cfg, self.s, self.out, self.storage, self.ctx, self.guard = tracking, subject, out, storage, context, guard
        self.loggers_by_service: dict[str, Guarded] = {}  # the services still working for this subject
        self.started: dict[str, Logger] = {}  # every run this attempt opened: each is ended by `close`
        self.warned: set[str] = set()

    # -- opening -----------------------------------------------------------------------------------------------
    def open(self) -> "SubjectRuns":
        from dbbatch.store.locations import join

        if not self.cfg.backends():
            return self
        ids_url = join(self.out, TRACKING_FILE)
        try:
            stored = self.storage.read_json(ids_url) or {}
        except StorageError as e:  # unreadable: the runs start anew rather than the subject failing
            log.warning("%s: cannot read %s (%s); starting new tracking runs", self.s.id, TRACKING_FILE, e)
            stored = {}
        stored = stored if isinstance(stored, dict) else {}
        ids = {k: v for k, v in stored.items() if isinstance(v, dict)}
        for service in self.cfg.backends():
            try:
                inner, run_id = getattr(self, f"_open_{service}")(ids.get(service) or {})
            except Exception as e:  # noqa: BLE001 - a service that cannot be reached never fails the subject
                self.failure(service, "starting its run", e)
                continue
            self.loggers_by_service[service] = Guarded(service, inner, lambda what, e, s=service: self.failure(s, what, e))
            self.started[service] = inner
            ids[service] = run_id
        if ids != stored and self.loggers_by_service:
            if self.guard is not None:
                self.guard(f"writing {TRACKING_FILE}")  # LeaseLost goes on: the subject is another worker's now
            try:
                self.storage.write_json(ids_url, ids)
            except StorageError as e:
                log.warning("%s: cannot store the tracking run ids (%s); a resumed attempt starts new runs", self.s.id, e)
        params = hyperparameters(self.s, self.ctx)
        for service, logger in list(self.loggers_by_service.items()):
            logger.call("logging the settings", lambda s=service, lg=logger: self._log_settings(s, lg.inner, params))
        return self

    def _log_settings(self, service: str, logger: Any, params: dict[str, Any]) -> None:
        """The settings as hyperparameters. A continued MLflow run keeps its first values (MLflow refuses to change
        a param): a setting changed since (a resume allows max_steps, checkpoint_every...) is said in the log."""
        if service == "mlflow":
            params = flatten("", params)
            logged = logger.experiment.get_run(logger.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v))
            if changed:
                log.info("%s: settings changed since its MLflow run started (%s); the run keeps their first values",
                         self.s.id, ", ".join(changed))
            params = {k: v for k, v in params.items() if k not in logged}
        if params:
            logger.log_hyperparams(params)

    def _open_wandb(self, stored: dict[str, Any]) -> tuple[Logger, dict[str, Any]]:
        from pytorch_lightning.loggers import WandbLogger

        cfg = self.cfg.wandb
        run_id = stored.get("id") if isinstance(stored.get("id"), str) else uuid.uuid4().hex[:16]
        folder = Path(cfg.dir or os.environ.get("WANDB_DIR") or self.ctx.work_dir / "wandb")
        if cfg.dir and not folder.is_absolute() and self.ctx.base_dir is not None:
            folder = self.ctx.base_dir / folder
        folder.mkdir(parents=True, exist_ok=True)
        tags = [*cfg.tags, f"batch:{self.ctx.batch_run_id}"] + ([f"sweep:{self.s.sweep_of}"] if self.s.sweep_of else [])
        import wandb

        # The run is made here, not by WandbLogger: it would reuse any run already active in the process (a
        # packed cohort has one per member at once).
        run = wandb.init(project=cfg.project, entity=cfg.entity, name=self.s.id, id=run_id, mode=cfg.mode, dir=str(folder),
                         group=self.ctx.batch_run_id, tags=[t[:64] for t in tags], job_type="dreambooth", resume="allow",
                         reinit="create_new", settings=wandb.Settings(silent=True, console="off", init_timeout=60))
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        logger = WandbLogger(experiment=run, project=cfg.project, name=self.s.id, id=run_id, save_dir=str(folder))
        return logger, {"id": run_id, "project": cfg.project}

    def _open_mlflow(self, stored: dict[str, Any]) -> tuple[Logger, dict[str, Any]]:
        from pytorch_lightning.loggers import MLFlowLogger

        for key, value in MLFLOW_PATIENCE.items():
            os.environ.setdefault(key, value)
        cfg = self.cfg.mlflow
        uri = mlflow_uri(cfg, self.ctx.output, self.ctx.work_dir)
        local = uri.startswith("sqlite:///") and not cfg.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri() if local else None
        tags = {"dbbatch.batch_run_id": self.ctx.batch_run_id, "dbbatch.subject": self.s.id,
                **({"dbbatch.sweep_of": self.s.sweep_of} if self.s.sweep_of else {})}
        run_id = stored.get("run_id") if isinstance(stored.get("run_id"), str) else None
        make = lambda run: MLFlowLogger(experiment_name=cfg.experiment, run_name=self.s.id, tracking_uri=uri,  # noqa: E731
                                        tags=tags, run_id=run, artifact_location=artifacts)
        logger = make(run_id)
        if run_id is not None:
            from mlflow.exceptions import MlflowException

            from dbbatch.store.locations import redact

            try:
                logger.experiment.set_tag(run_id, "dbbatch.resumed_by", self.ctx.batch_run_id)
                logger.experiment.update_run(run_id, status="RUNNING")
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                # another store (a new pod's local one, another tracking_uri): the run goes on as a new one there
                log.info("%s: MLflow run %s is not in %s; starting a new run", self.s.id, run_id, redact(uri))
                logger = make(None)
        return logger, {"run_id": logger.run_id, "experiment_id": logger.experiment_id}

    def failure(self, service: str, what: str, e: BaseException) -> None:
        if service in self.warned:
            return
        self.warned.add(service)
        self.loggers_by_service.pop(service, None)
        tb = "the TensorBoard log is complete" if self.cfg.tensorboard else "TensorBoard is off"
        log.warning("%s: tracking.%s failed while %s (%s: %s); training goes on without it (%s)", self.s.id, service,
                    what, type(e).__name__, _one_line(e), tb)

    # -- during and after training -------------------------------------------------------------------------------
    def loggers(self, members: tuple[str, ...] = ()) -> list[Guarded]:
        """The Trainer's loggers for this subject (a cohort member's see only their own metrics)."""
        out = []
        for service, g in list(self.loggers_by_service.items()):
            if members:
                g = Guarded(service, g.inner, lambda what, e, s=service: self.failure(s, what, e), self.s.id, members)
                self.loggers_by_service[service] = g
            out.append(g)
        return out

    def each(self, what: str, fn: Callable[[Logger], Any]) -> None:
        for service, g in list(self.loggers_by_service.items()):
            if not g.failed:
                g.call(what, lambda inner=g.inner: fn(inner))

    def log_losses(self, losses: list[float], first_step: int) -> None:
        """Losses of steps trained in other processes (DDP), logged when training ends."""
        for k, loss in enumerate(losses):
            self.each("logging the loss", lambda lg, k=k, loss=loss: lg.log_metrics({"loss": loss}, first_step + k + 1))

    def log_evaluation(self, evaluation: Optional[dict[str, Any]]) -> None:
        """metrics.json's evaluation: the base model's point at step 0, every scored point at its step."""
        from dbbatch.config.metric_names import METRICS

        if not evaluation:
            return
        baseline = [{**evaluation["baseline"], "step": 0}] if isinstance(evaluation.get("baseline"), dict) else []
        for p in baseline + list(evaluation.get("points") or []):
            values = {f"eval/{m}": float(p[m]) for m in METRICS if isinstance(p.get(m), (int, float))}
            if values and isinstance(p.get("step"), int):
                self.each("logging the evaluation", lambda lg, v=values, step=p["step"]: lg.log_metrics(v, step))

    def close(self, status: str, grid_png: Optional[bytes] = None, summary: Optional[dict[str, Any]] = None) -> None:
        """The sample grid, the output URL and `summary` (published step, flags), then every run this attempt
        started ends (`status`: success or failed), also one whose service failed on the way (best effort), so
        none is left running. A preempted subject's runs are not closed: the next attempt continues them."""
        from dbbatch.store.locations import redact

        summary = {"output": redact(self.out), **(summary or {})}
        for service, inner in self.started.items():
            g = self.loggers_by_service.get(service)
            if g is not None and not g.failed:
                g.call("logging the outputs", lambda s=service: getattr(self, f"_outputs_{s}")(inner, grid_png, summary))
            try:
                getattr(self, f"_end_{service}")(inner, status)
            except Exception as e:  # noqa: BLE001 - said once, like every other failure of a service
                self.failure(service, "ending its run", e)
        self.loggers_by_service.clear()
        self.started.clear()

    def _outputs_wandb(self, logger: Any, grid_png: Optional[bytes], summary: dict[str, Any]) -> None:
        if grid_png is not None:
            from PIL import Image

            logger.log_image("samples/grid", [Image.open(io.BytesIO(grid_png))])
        for key, value in summary.items():
            logger.experiment.summary[key] = value

    def _end_wandb(self, logger: Any, status: str) -> None:
        logger.experiment.finish(exit_code=0 if status == "success" else 1)

    def _outputs_mlflow(self, logger: Any, grid_png: Optional[bytes], summary: dict[str, Any]) -> None:
        client, run_id = logger.experiment, logger.run_id
        if grid_png is not None:
            from PIL import Image

            client.log_image(run_id, Image.open(io.BytesIO(grid_png)), "samples/grid.png")
        for key, value in summary.items():
            client.set_tag(run_id, f"dbbatch.{key}", str(value)[:5000])

    def _end_mlflow(self, logger: Any, status: str) -> None:
        logger.experiment.set_terminated(logger.run_id, "FINISHED" if status == "success" else "FAILED")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
