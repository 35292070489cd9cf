"""Kubernetes objects for one batch: a ConfigMap holding the manifest and an Indexed Job over N shards. Pure.

The objects are built in code rather than from a YAML template: every optional part (GPUs, Kueue, IRSA,
a Secret) changes the structure, not just a value, and code is what the tests assert on field by field.
`k8s/examples/` holds rendered output; `tests/test_k8s.py` re-renders it and checks it has not drifted.

How the Job maps dbbatch's exit codes (core/exit_codes.py, which says what each means) to Kubernetes' retry
machinery:
  pod disrupted (preemption, eviction, node drain: condition DisruptionTarget)  Ignore: retried, not counted
  exit 143 / 130 (a checkpoint stored after SIGTERM / SIGINT)                   Ignore: retried, not counted
  exit 2   (invalid manifest or input: retrying cannot help)                    FailIndex: no more retries
  exit 1 / 3 / anything else                                                    counted against backoffLimitPerIndex
Each index is one shard (`dbbatch run` reads JOB_COMPLETION_INDEX and DBBATCH_SHARD_COUNT); a retried index
skips its finished subjects and resumes the half-trained one from its stored checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from dbbatch.config.manifest import Manifest, source_of
from dbbatch.config.parse import parse_manifest
from dbbatch.core.errors import InputError
from dbbatch.core.exit_codes import JOB_ACTIONS

USER_ID = 10001  # the image's numeric non-root user (Dockerfile); numeric so runAsNonRoot can verify it
MANIFEST_DIR = "/etc/dbbatch"
MANIFEST_KEY = "manifest.yaml"
SCRATCH = "/scratch"
# Where the image expects its writable state; the same values as the Dockerfile's ENV, repeated here so a
# Job built on another image (BASE_IMAGE) still keeps every cache on the scratch volume.
SCRATCH_ENV = {
    "DBBATCH_WORK_DIR": f"{SCRATCH}/work",
    "HF_HOME": f"{SCRATCH}/hf",
    "TMPDIR": SCRATCH,  # the volume's root always exists; a subfolder would not until someone creates it
    "HOME": f"{SCRATCH}/home",
    "XDG_CACHE_HOME": f"{SCRATCH}/cache",
}
# SIGTERM -> the current optimizer step ends -> a checkpoint is written and uploaded -> exit 143. The
# largest case is SD 1.5 with AdamW: 860M UNet parameters x 3 fp32 tensors (weights, two moments) ~ 10 GiB,
# about 20 s to write locally and ~200 s to upload at 50 MB/s. 300 s leaves room for a slow step and
# retries. (A cloud's spot reclaim notice, 30 s to 2 min, caps this whatever it says: there the periodic
# `checkpoint_every` checkpoints are what a retry resumes from.)
TERMINATION_GRACE_SECONDS = 300
CONFIGMAP_MAX_BYTES = 1024 * 1024  # the API server's limit on a ConfigMap's total size
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+)?$")  # Kubernetes resource.Quantity
_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


@dataclass(frozen=True)
class JobOptions:
    """Everything about the Job that is not in the manifest. Defaults suit a GPU cluster."""

    name: str
    image: str
    shards: int
    gpus_per_pod: int = 1
    namespace: str = "default"
    parallelism: Optional[int] = None  # pods at once; default: every shard
    output: Optional[str] = None  # passed as `dbbatch run --output`
    service_account: Optional[str] = None
    service_account_annotations: dict[str, str] = field(default_factory=dict)  # IRSA / workload identity
    secret: Optional[str] = None  # envFrom: e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    kueue: Optional[str] = None  # Kueue LocalQueue
    work_queue: bool = False  # every pod runs `dbbatch run --queue` (shards = pods; leases divide the subjects)
    backoff_limit_per_index: int = 3
    max_failed_indexes: Optional[int] = None  # default: every shard may fail without stopping the others
    cpu: str = "4"
    memory: str = "32Gi"
    shm_size: str = "8Gi"
    scratch_size: str = "100Gi"
    node_selector: Optional[dict[str, str]] = None  # default: NVIDIA GPU feature discovery's label when gpus > 0
    ttl_seconds_after_finished: int = 7 * 24 * 3600
    image_pull_policy: str = "IfNotPresent"


def job_name_from(path_stem: str) -> str:
    """`manifests/My_Batch.yaml` -> `dbbatch-my-batch`: a DNS label Kubernetes accepts."""
    slug = re.sub(r"[^a-z0-9-]+", "-", path_stem.lower()).strip("-")
    return f"dbbatch-{slug}"[:52].rstrip("-") if slug else "dbbatch"


def check_options(o: JobOptions) -> list[str]:
    """Every problem with the options at once, each naming the flag and how to fix it."""
    problems = []
    # Indexed Job pods carry the Job name in a label (63 chars max) and the ConfigMap adds "-manifest".
    if not _DNS_LABEL.match(o.name) or len(o.name) > 52:
        problems.append(f"--name: {o.name!r} is not a Kubernetes name; use lowercase letters, digits and '-', at most 52 characters")
    if not _DNS_LABEL.match(o.namespace) or len(o.namespace) > 63:
        problems.append(f"--namespace: {o.namespace!r} is not a Kubernetes namespace name; use lowercase letters, digits and '-'")
    if not o.image.strip():
        problems.append("--image: empty; give the image reference, e.g. registry.example.com/dbbatch:0.1.0")
    # 100000 is the API server's limit for Indexed Jobs with backoffLimitPerIndex
    if not 1 <= o.shards <= 100000:
        problems.append(f"--shards: must be between 1 and 100000, got {o.shards}")
    if o.gpus_per_pod < 0:
        problems.append(f"--gpus-per-pod: must be >= 0 (0 runs on CPU nodes), got {o.gpus_per_pod}")
    if o.parallelism is not None and not 1 <= o.parallelism <= max(o.shards, 1):
        problems.append(f"--parallelism: must be between 1 and --shards ({o.shards}), got {o.parallelism}")
    if o.backoff_limit_per_index < 0:
        problems.append(f"--retries: must be >= 0, got {o.backoff_limit_per_index}")
    if o.max_failed_indexes is not None and not 0 <= o.max_failed_indexes <= o.shards:
        problems.append(f"--max-failed-indexes: must be between 0 and --shards ({o.shards}), got {o.max_failed_indexes}")
    for flag, value in (("--cpu", o.cpu), ("--memory", o.memory), ("--shm-size", o.shm_size), ("--scratch-size", o.scratch_size)):
        if not _QUANTITY.match(value):
            problems.append(f"{flag}: {value!r} is not a Kubernetes quantity; write e.g. 4, 500m, 32Gi")
    if o.service_account_annotations and not o.service_account:
        problems.append("--sa-annotation: needs --service-account NAME (the ServiceAccount that carries the annotation)")
    for flag, value in (("--service-account", o.service_account), ("--secret", o.secret), ("--kueue", o.kueue)):
        if value is not None and not _DNS_LABEL.match(value):
            problems.append(f"{flag}: {value!r} is not a Kubernetes name; use lowercase letters, digits and '-'")
    return problems


def pod_warnings(manifest: Manifest, output_override: Optional[str]) -> list[str]:
    """What works on a laptop but not in a pod: local paths (the pod's disk is gone when it ends) and
    credentials written into the manifest (a ConfigMap is readable by anyone who may read ConfigMaps)."""
    warnings = []
    url_hint = "use an object-store URL such as s3://bucket/..."

    def local(where: str, location: str, writes: bool) -> None:
        if "://" in location or location.startswith("builtin:"):
            return
        what = "what the pod writes there is lost when it ends" if writes else "a pod cannot see your machine's files"
        warnings.append(f"{where}: {location!r} is a local path; {what}; {url_hint}")

    local("--output" if output_override else "output", output_override or manifest.output, True)
    if manifest.prior_cache:
        local("prior_cache", manifest.prior_cache, True)
    if manifest.base_model.startswith((".", "/", "~")):  # not every slash: a hub id (org/name) has one too
        local("base_model", manifest.base_model, False)
    for i, s in enumerate(manifest.subjects):
        for image in [s.images] if isinstance(s.images, str) else s.images:
            local(f"{source_of(manifest, i)}.images", image, False)
    tracking = manifest.tracking
    if tracking.wandb is not None and tracking.wandb.mode == "offline":
        warnings.append("tracking.wandb.mode: offline writes W&B's run files to the pod's disk, lost when it ends; use "
                        "online (WANDB_API_KEY from --secret) or point tracking.wandb.dir at a mounted volume")
    if tracking.mlflow is not None and not tracking.mlflow.tracking_uri:
        warnings.append("tracking.mlflow.tracking_uri: null keeps the runs in a SQLite file on the pod's disk (or beside "
                        "a local output), lost when it ends; give an MLflow server (its credentials from --secret)")
    for protocol, options in manifest.storage_options.items():
        for key in options:
            if any(w in key.lower() for w in _SECRET_WORDS):
                warnings.append(f"storage_options.{protocol}.{key}: a credential in the manifest ends up in a ConfigMap; "
                                "remove it and use --secret or --service-account")
    return list(dict.fromkeys(warnings))  # a sweep's variants share their subject's photos: one line


def render(manifest_text: str, options: JobOptions, source: str = "manifest") -> list[dict[str, Any]]:
    """The objects to `kubectl apply`, in apply order. Raises ManifestError / InputError on bad input."""
    parse_manifest(manifest_text, source)  # a Job that can only exit 2 is not worth submitting
    problems = check_options(options)
    size = len(manifest_text.encode("utf-8"))
    if size > CONFIGMAP_MAX_BYTES - 4096:  # leave room for the object's metadata
        problems.append(f"{source}: {size} bytes; a ConfigMap holds at most 1 MiB: split the manifest into several Jobs")
    if problems:
        raise InputError("; ".join(problems))
    o = options
    labels = {"app.kubernetes.io/name": "dbbatch", "app.kubernetes.io/instance": o.name}
    objects: list[dict[str, Any]] = []
    if o.service_account_annotations:
        objects.append({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": o.service_account, "namespace": o.namespace, "labels": labels,
                         "annotations": dict(o.service_account_annotations)},
        })
    configmap = f"{o.name}-manifest"
    objects.append({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": configmap, "namespace": o.namespace, "labels": labels},
        "data": {MANIFEST_KEY: manifest_text},
    })
    objects.append(_job(o, labels, configmap))
    return objects


def _job(o: JobOptions, labels: dict[str, str], configmap: str) -> dict[str, Any]:
    args = ["run", f"{MANIFEST_DIR}/{MANIFEST_KEY}"]
    if o.output:
        args += ["--output", o.output]
    if o.work_queue:
        args.append("--queue")  # each pod takes the next unleased subject; a dead pod's lease expires and is taken over
        env: list[dict[str, Any]] = []
    else:
        env = [{"name": "DBBATCH_SHARD_COUNT", "value": str(o.shards)}]  # JOB_COMPLETION_INDEX is set by Kubernetes
    env += [{"name": k, "value": v} for k, v in SCRATCH_ENV.items()]
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})  # log lines reach `kubectl logs` as they happen
    resources: dict[str, Any] = {
        "requests": {"cpu": o.cpu, "memory": o.memory},
        "limits": {"memory": o.memory},  # /dev/shm (medium: Memory) counts against this limit
    }
    if o.gpus_per_pod:
        # extended resources are limits only (requests default to them) and cannot be overcommitted
        resources["limits"]["nvidia.com/gpu"] = o.gpus_per_pod
    container: dict[str, Any] = {
        "name": "dbbatch",
        "image": o.image,
        "imagePullPolicy": o.image_pull_policy,
        "args": args,  # not `command`: the image's ENTRYPOINT (tini -- dbbatch) stays PID 1
        "env": env,
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "manifest", "mountPath": MANIFEST_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH},
            # PyTorch DataLoader workers and NCCL pass tensors through shared memory; Docker's 64 MiB default
            # is too small for either
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if o.secret:
        container["envFrom"] = [{"secretRef": {"name": o.secret}}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job controller does the retrying
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        # IRSA and workload identity inject their own token; the Kubernetes API token is not needed
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "fsGroup": USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "manifest", "configMap": {"name": configmap}},
            # the work dir, the base-model and Hugging Face caches, TMPDIR: one disk-backed volume, so the
            # root filesystem stays read-only; sizeLimit gets the pod evicted instead of filling the node
            {"name": "scratch", "emptyDir": {"sizeLimit": o.scratch_size}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": o.shm_size}},
        ],
    }
    if o.service_account:
        pod_spec["serviceAccountName"] = o.service_account
    selector = o.node_selector if o.node_selector is not None else (
        {"nvidia.com/gpu.present": "true"} if o.gpus_per_pod else {})  # label from NVIDIA GPU feature discovery
    if selector:
        pod_spec["nodeSelector"] = dict(selector)
    if o.gpus_per_pod:
        # GPU node pools are usually tainted so that only pods asking for GPUs land there (EKS, GKE, AKS)
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

    job_labels = dict(labels)
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": o.shards,
        "parallelism": o.parallelism or o.shards,
        "backoffLimitPerIndex": o.backoff_limit_per_index,
        "maxFailedIndexes": o.shards if o.max_failed_indexes is None else o.max_failed_indexes,
        "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            *({"action": action, "onExitCodes": {"containerName": "dbbatch", "operator": "In", "values": list(codes)}}
              for action, codes in JOB_ACTIONS.items()),
        ]},
        "ttlSecondsAfterFinished": o.ttl_seconds_after_finished,
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if o.kueue:
        job_labels["kueue.x-k8s.io/queue-name"] = o.kueue
        # Kueue's webhook would suspend it too; saying so here means no pod starts before admission even if the
        # webhook is slow or missing (then the Job waits, visibly, instead of bypassing the quota)
        spec["suspend"] = True
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": o.name, "namespace": o.namespace, "labels": job_labels},
        "spec": spec,
    }


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order built, multi-line strings (the manifest) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]], header: str = "") -> str:
    """Multi-document YAML for `kubectl apply -f -`; `header` becomes leading comment lines."""
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    docs = [yaml.dump(o, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)
            for o in objects]
    return comment + "---\n" + "---\n".join(docs)
