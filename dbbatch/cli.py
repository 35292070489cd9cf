"""The `dbbatch` command. Thin: parses options, calls the library, maps errors to exit codes.

Exit codes (a contract the Kubernetes Job's podFailurePolicy relies on):
  0    every selected subject succeeded or was already done
  1    at least one subject failed (retrying may help), or an unexpected error
  2    invalid manifest or input (do not retry)
  3    storage unreachable or not writable at the batch level (output, prior cache, base model download)
  130  interrupted by SIGINT (Ctrl-C): checkpoints and the report stored, like 143
  143  preempted by SIGTERM: checkpoints stored, retry
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click
import typer

from dbbatch.console import print_results, quiet_libraries, setup_logging
from dbbatch.core.errors import DbbatchError, InputError, ManifestError, Preempted, StorageError
from dbbatch.core.exit_codes import FAILED as EXIT_FAILED
from dbbatch.core.exit_codes import INVALID as EXIT_INVALID
from dbbatch.core.exit_codes import STORAGE as EXIT_STORAGE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DreamBooth fine-tuning of Stable Diffusion for many subjects, as a batch job.")
k8s_app = typer.Typer(no_args_is_help=True, help="Kubernetes Job manifests.")
app.add_typer(k8s_app, name="k8s")
log = logging.getLogger("dbbatch")
_debug = False


def _setup_logging(debug: bool) -> None:
    global _debug
    _debug = debug
    setup_logging(debug)


def _fail(exc: BaseException) -> "typer.Exit":
    """Print one line for a known error (one per problem of a manifest) and return the exit to raise."""
    if isinstance(exc, ManifestError):
        for p in exc.problems:
            log.error("%s: %s", exc.source, p)
        return typer.Exit(EXIT_INVALID)
    log.error("%s", exc)
    if _debug:
        log.exception("details")
    if isinstance(exc, Preempted):
        from dbbatch.core import signals

        return typer.Exit(signals.exit_code())  # EXIT_PREEMPTED, or EXIT_INTERRUPTED after SIGINT
    if isinstance(exc, InputError):
        return typer.Exit(EXIT_INVALID)
    if isinstance(exc, StorageError):
        return typer.Exit(EXIT_STORAGE)
    return typer.Exit(EXIT_FAILED)


def _one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Known errors become their one line and exit code; anything else (a bug, or a library failing in a way
    we did not foresee) becomes one line too, with the traceback only under --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit,
                KeyboardInterrupt):
            raise
        except DbbatchError as e:
            raise _fail(e) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence against a traceback
            first = str(e).splitlines()[0][:300] if str(e) else ""
            log.error("unexpected error: %s%s%s", type(e).__name__, ": " if first else "", first)
            if _debug:
                log.exception("details")
            else:
                log.error("rerun with --debug for the traceback, and report it if the line above does not say what to fix")
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper


def _load(manifest_path: Path):
    from dbbatch.models.defaults import load_manifest

    return load_manifest(manifest_path)


@app.command()
@_one_line_errors
def validate(
    manifest: Path = typer.Argument(..., help="The manifest YAML."),
    output: Optional[str] = typer.Option(None, "--output", help="Override the manifest's output location."),
    check_remote: bool = typer.Option(True, "--check-remote/--no-check-remote", help="Also check images resolve and the output is writable."),
    show_settings: bool = typer.Option(False, "--show-settings", help="Print each subject's resolved training settings and where each came from."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Check the whole manifest and report every problem at once (exit 2 if any)."""
    _setup_logging(debug)
    from dbbatch.batch.validation import check_manifest, locations
    from dbbatch.store.storage import Storage

    m, base_dir = _load(manifest)
    out, cache = locations(m, base_dir, output)
    storage = Storage(m.storage_options)
    if check_remote:
        quiet_libraries()
    found = check_manifest(m, base_dir, storage, check_remote, out, cache)
    if check_remote and not found.storage and (no_lease := storage.lease_support(out)):
        found.warnings.append(f"output: {no_lease}; `dbbatch run` refuses it unless given --no-leases")
    for w in found.warnings:
        log.warning("%s: %s", manifest, w)
    for p in found.problems + found.storage:
        log.error("%s: %s", manifest, p)
    if found.problems:
        raise typer.Exit(EXIT_INVALID)
    if found.storage:
        raise typer.Exit(EXIT_STORAGE)
    if show_settings:
        from dbbatch.config.resolve import resolve_subjects

        for subject in resolve_subjects(m, base_dir):
            for path, origin in subject.settings_from.items():
                value = functools.reduce(getattr, path.split("."), subject)  # train.lora.rank: nested
                typer.echo(f"{subject.id}\t{path} = {value}\t(from {origin})")
    swept: dict[str, list[str]] = {}
    for s in m.subjects:
        if s._sweep_of is not None:
            swept.setdefault(s._sweep_of, []).append(s.id)
    for base, ids in swept.items():
        typer.echo(f"{base}: sweep of {len(ids)} variant(s): {', '.join(ids)}")
    typer.echo(f"{manifest}: OK ({len(m.subjects)} subject(s), output {out})")


@app.command()
@_one_line_errors
def run(
    manifest: Path = typer.Argument(..., help="The manifest YAML."),
    output: Optional[str] = typer.Option(None, "--output", help="Override the manifest's output location."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only this subject id (repeatable; a swept subject's id "
                                             "runs all its variants)."),
    force: bool = typer.Option(False, "--force", help="Redo subjects that are already done (their outputs are deleted first)."),
    # envvar, not os.environ at import: a bad value is a one-line usage error (exit 2), not a traceback
    shard_index: int = typer.Option(0, "--shard-index", envvar="JOB_COMPLETION_INDEX", help="This shard (a Kubernetes Indexed Job sets $JOB_COMPLETION_INDEX)."),
    shard_count: int = typer.Option(1, "--shard-count", envvar="DBBATCH_SHARD_COUNT", help="Number of shards."),
    queue: bool = typer.Option(False, "--queue", help="Work queue: take the next unleased, unfinished subject of the whole "
                               "manifest, in order, instead of a fixed shard (run one per pod; --shard-* are ignored)."),
    lease_seconds: float = typer.Option(120.0, "--lease-seconds", envvar="DBBATCH_LEASE_SECONDS", min=2.0,
                                        help="Lease time-to-live: a SIGKILLed worker's subjects are taken over this long "
                                        "after its last renewal (renewed every third of it)."),
    no_leases: bool = typer.Option(False, "--no-leases", help="Run without leases on an output that cannot hold them "
                                   "(not a local path or s3://), accepting that two workers may train one subject."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print this shard's subjects and their state; train nothing, write nothing."),
    report: Optional[str] = typer.Option(None, "--report", help="Also write the machine-readable run report here."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", envvar="DBBATCH_WORK_DIR", show_default=False,
                                            help="Local scratch and cache folder (default $DBBATCH_WORK_DIR or ~/.cache/dbbatch)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Train every subject of the manifest (or of this shard) end to end."""
    _setup_logging(debug)
    from dbbatch.core import signals

    signals.install()
    work_dir = work_dir or Path.home() / ".cache" / "dbbatch"
    from dbbatch.batch.validation import check_manifest, locations, writable_problem
    from dbbatch.config.resolve import resolve_subjects
    from dbbatch.config.sharding import select
    from dbbatch.store.storage import Storage

    try:
        m, base_dir = _load(manifest)
        out, cache = locations(m, base_dir, output)
        storage = Storage(m.storage_options)
        found = check_manifest(m, base_dir, storage, False, out, cache)
        for w in found.warnings:
            log.warning("%s: %s", manifest, w)
        if found.problems:
            raise ManifestError(found.problems, str(manifest))
        subjects = resolve_subjects(m, base_dir)
        if only:
            unknown = sorted(set(only) - {s.id for s in subjects} - {s.sweep_of for s in subjects})
            if unknown:
                raise InputError(f"--only {unknown[0]}: no such subject in {manifest}")
            subjects = [s for s in subjects if s.id in only or s.sweep_of in only]  # a swept subject: all its variants
        if queue and no_leases:
            raise InputError("--queue needs leases (workers divide the subjects through them); drop --no-leases")
        if queue:
            shard_index, shard_count = 0, 1  # every worker looks at every subject; leases divide them
        try:
            mine = set(select([s.id for s in subjects], shard_index, shard_count))
        except ValueError as e:
            raise InputError(f"--shard-index/--shard-count: {e}") from None
        subjects = [s for s in subjects if s.id in mine]
    except DbbatchError as e:
        raise _fail(e) from None

    from dbbatch.batch.batch import Batch
    from dbbatch.batch.results import RunOptions
    from dbbatch.core.progress import Reporter

    opts = RunOptions(output=out, prior_cache=cache, work_dir=work_dir, force=force, debug=debug, leases=not no_leases,
                      lease_seconds=lease_seconds)
    if dry_run:
        batch = Batch(m, base_dir, storage, opts, reporter=None)
        typer.echo(f"queue: {len(subjects)} subject(s)" if queue else f"shard {shard_index}/{shard_count}: {len(subjects)} subject(s)")
        try:
            todo = []
            for s in subjects:
                state = batch.state_of(s)
                typer.echo(f"{s.id}\t{state}")
                todo += [s] if state != "done" else []
            from dbbatch.config.packing import cohorts, describe

            per_step, stored = m.packing.subjects_per_step, batch.stored_cohorts()
            if todo and (per_step > 1 or stored):
                typer.echo(f"cohorts (packing.subjects_per_step {per_step}):")
                for c in cohorts(todo, per_step, stored):
                    typer.echo(f"  {describe(c)}")
        except DbbatchError as e:
            raise _fail(e) from None
        return

    quiet_libraries()
    reporter = Reporter()
    try:
        storage.reporter = reporter
        for location, field_name in ((out, "output"), (cache, "prior_cache")):
            not_writable = writable_problem(storage, location, field_name)
            if not_writable:
                raise StorageError(not_writable)
        if not no_leases and (no_lease := storage.lease_support(out)):
            raise InputError(f"output: {no_lease}, so two workers on it could train one subject at once; use a local "
                             "path or s3://, or pass --no-leases to accept that risk")
        batch = Batch(m, base_dir, storage, opts, reporter)
        where = "work queue" if queue else f"shard {shard_index}/{shard_count}"
        log.info("run %s: %d subject(s) (%s) -> %s", opts.run_id, len(subjects), where, out)
        results = batch.run(subjects)
    except DbbatchError as e:
        reporter.stop()
        raise _fail(e) from None
    finally:
        reporter.stop()
    # A stop signal exits 128 + its number whenever it came, even after the last subject was published: exit 0
    # would tell Kubernetes the index succeeded while a subject it preempted may be unfinished.
    preempted = any(r.status == "preempted" for r in results) or signals.requested()
    summary = batch.write_report(results, {"shard_index": shard_index, "shard_count": shard_count,
                                           "preempted": preempted, "stop_signal": signals.name() if preempted else None,
                                           "sigterm_to_exit_seconds": round(signals.seconds_since_request(), 3) if preempted else None})
    if report:
        try:
            from dbbatch.config.resolve import resolve_location

            storage.write_text(resolve_location(report, Path.cwd()), json.dumps(summary, indent=2) + "\n")
        except DbbatchError as e:
            log.error("could not write --report: %s", e)
    print_results(results)
    if not preempted:  # a preempted pod's grace period is for its checkpoint and exit code, not the report
        from dbbatch.quality.report import refresh

        page = refresh(storage, out, [s.id for s in resolve_subjects(m, base_dir)], batch.leases, stop=signals.requested)
        if page:
            typer.echo(f"report: {page}")
    preempted = preempted or signals.requested()  # one that came while the report was built exits 143 too
    if preempted:
        log.warning("preempted: %s to exit took %.2fs; rerun to resume", signals.name(), signals.seconds_since_request())
        raise typer.Exit(signals.exit_code())  # EXIT_PREEMPTED, or EXIT_INTERRUPTED after SIGINT
    failed = [r for r in results if r.status == "failed"]
    if failed:
        all_input = all(r.error_class in ("ImageError", "InputError", "ModelError") for r in failed)
        attempted = [r for r in results if r.status != "skipped"]  # subjects already done say nothing about input
        log.error("%d of %d subject(s) failed", len(failed), len(results))
        raise typer.Exit(EXIT_INVALID if all_input and len(failed) == len(attempted) else EXIT_FAILED)


@k8s_app.command("render")
def k8s_render(
    manifest: Path = typer.Argument(..., help="The manifest YAML (it goes into the ConfigMap as it is)."),
    image: str = typer.Option(..., "--image", help="The dbbatch image, e.g. registry.example.com/dbbatch:0.1.0."),
    shards: int = typer.Option(..., "--shards", help="Job completions: the subjects are split into this many shards."),
    gpus_per_pod: int = typer.Option(1, "--gpus-per-pod", help="nvidia.com/gpu per pod; 0 for CPU nodes."),
    namespace: str = typer.Option("default", "--namespace", "-n"),
    name: Optional[str] = typer.Option(None, "--name", help="Job name (default dbbatch-<manifest file name>)."),
    parallelism: Optional[int] = typer.Option(None, "--parallelism", help="Pods at once (default: --shards)."),
    output: Optional[str] = typer.Option(None, "--output", help="Passed to `dbbatch run --output` (an object-store URL)."),
    service_account: Optional[str] = typer.Option(None, "--service-account", help="Run the pods as this ServiceAccount."),
    sa_annotation: Optional[list[str]] = typer.Option(
        None, "--sa-annotation", help="KEY=VALUE (repeatable): also render the ServiceAccount with this annotation, "
        "e.g. eks.amazonaws.com/role-arn=arn:aws:iam::123456789012:role/dbbatch (IRSA)."),
    secret: Optional[str] = typer.Option(None, "--secret", help="A Secret whose keys become environment variables (envFrom)."),
    work_queue: bool = typer.Option(False, "--queue", help="Pods run `dbbatch run --queue`: each takes the next unleased "
                                    "subject instead of a fixed shard (--shards is then the number of pods)."),
    kueue: Optional[str] = typer.Option(None, "--kueue", help="Kueue LocalQueue name (the Job is created suspended)."),
    retries: int = typer.Option(3, "--retries", help="backoffLimitPerIndex: failed pods per shard before it is given up."),
    max_failed_indexes: Optional[int] = typer.Option(None, "--max-failed-indexes", help="Fail the whole Job after this many shards failed (default: never early)."),
    cpu: str = typer.Option("4", "--cpu", help="CPU request per pod."),
    memory: str = typer.Option("32Gi", "--memory", help="Memory request and limit per pod (includes /dev/shm)."),
    shm_size: str = typer.Option("8Gi", "--shm-size", help="/dev/shm size (RAM, counted in --memory)."),
    scratch_size: str = typer.Option("100Gi", "--scratch-size", help="Scratch volume limit: work dir, model caches, checkpoints being written."),
    node_selector: Optional[list[str]] = typer.Option(None, "--node-selector", help="KEY=VALUE (repeatable); default nvidia.com/gpu.present=true with GPUs."),
) -> None:
    """Print a ConfigMap (the manifest) and an Indexed Job as YAML for `kubectl apply -f -`."""
    _setup_logging(False)
    from dbbatch.deploy import k8s

    try:
        m, _ = _load(manifest)  # a missing, unreadable or invalid file reported the usual way
        text = manifest.read_text(encoding="utf-8")
        opts = k8s.JobOptions(
            name=name or k8s.job_name_from(manifest.stem), image=image, shards=shards, gpus_per_pod=gpus_per_pod,
            namespace=namespace, parallelism=parallelism, output=output, service_account=service_account,
            service_account_annotations=_pairs("--sa-annotation", sa_annotation), secret=secret, kueue=kueue,
            work_queue=work_queue,
            backoff_limit_per_index=retries, max_failed_indexes=max_failed_indexes, cpu=cpu, memory=memory,
            shm_size=shm_size, scratch_size=scratch_size,
            node_selector=_pairs("--node-selector", node_selector) if node_selector else None)
        objects = k8s.render(text, opts, str(manifest))
    except DbbatchError as e:
        raise _fail(e) from None
    for w in k8s.pod_warnings(m, output):
        log.warning("%s", w)
    import shlex

    from dbbatch import __version__

    header = f"Rendered by dbbatch {__version__}; do not edit, re-render:\n{shlex.join(['dbbatch', *sys.argv[1:]])}"
    typer.echo(k8s.to_yaml(objects, header), nl=False)


def _pairs(flag: str, items: Optional[list[str]]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"{flag}: {item!r} is not KEY=VALUE")
        out[key] = value
    return out


@app.command()
@_one_line_errors
def report(
    output: str = typer.Argument(..., help="The batch's output location (a path or fsspec URL), as its manifest names it."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="The batch's manifest: its storage_options, and its "
                                            "subjects that nothing is stored for yet (listed as pending)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Rebuild OUTPUT/_report/ (index.html, summary.json) from what every shard and run stored."""
    _setup_logging(debug)
    quiet_libraries()
    from dbbatch.config.resolve import resolve_location, resolve_subjects
    from dbbatch.quality.report import REPORT, build_serialized
    from dbbatch.store.leases import Leases
    from dbbatch.store.locations import join
    from dbbatch.store.storage import Storage

    try:
        ids = None
        options: dict[str, Any] = {}
        if manifest is not None:
            m, base_dir = _load(manifest)
            options, ids = m.storage_options, [s.id for s in resolve_subjects(m, base_dir)]
        out = resolve_location(output, Path.cwd())
        storage = Storage(options)
        if not storage.exists(out):
            raise InputError(f"OUTPUT {output}: nothing is stored there; give the output location of a batch")
        # under the report's lease where the output can hold one, so it never interleaves with a shard's build
        leases = Leases(storage, out, f"report-{os.getpid()}") if storage.lease_support(out) is None else None
        summary = build_serialized(storage, out, ids, leases)
    except DbbatchError as e:
        raise _fail(e) from None
    t = summary["totals"]
    typer.echo(f"{t['subjects']} subject(s): {t['succeeded']} succeeded, {t['failed']} failed, {t['flagged']} flagged, "
               f"{t['pending'] + t['preempted']} not done")
    typer.echo(f"report: {join(out, REPORT, 'index.html')}")


@app.command()
def schema() -> None:
    """Print the manifest's JSON Schema."""
    from dbbatch.config.manifest import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command("tiny-model")
def tiny_model(
    out_dir: Path = typer.Argument(..., help="Folder to write the diffusers pipeline to."),
    arch: str = typer.Option("tiny-sd", "--arch", help="Built-in model: tiny-sd, small-sd, sd15, tiny-sdxl, sdxl, tiny-flux, tiny-flux-schnell, flux (random weights) or toy-sd (pretrained)."),
) -> None:
    """Write a built-in model (random weights from a fixed seed, or toy-sd's trained ones) as a diffusers folder."""
    _setup_logging(False)
    quiet_libraries()
    from dbbatch.models.loading import write_builtin

    try:
        write_builtin(arch, out_dir)
    except DbbatchError as e:
        raise _fail(e) from None
    typer.echo(f"wrote builtin:{arch} to {out_dir}")


@app.command()
def version() -> None:
    """Print the dbbatch version."""
    from dbbatch import __version__

    typer.echo(__version__)


def main() -> None:
    app()
