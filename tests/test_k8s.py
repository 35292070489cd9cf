"""`dbbatch k8s render`: the ConfigMap + Indexed Job it prints, checked field by field and against the
Kubernetes API schemas (kubernetes-validate --strict, the schemas ship in its wheel; no cluster)."""

from __future__ import annotations

import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import REPO, run_cli

from dbbatch.config.parse import parse_manifest
from dbbatch.core.errors import InputError, ManifestError
from dbbatch.deploy import k8s

# kubernetes-validate picks the newest schema not newer than the version asked for; these are the exact
# schema folders its wheel ships (v1.30.0-local-strict, v1.33.0-local-strict)
K8S_VERSIONS = ["1.30.0", "1.33.0"]
DEMO = REPO / "manifests" / "demo.yaml"
MANIFEST = DEMO.read_text()


def opts(**kw) -> k8s.JobOptions:
    base = dict(name="dbbatch-demo", image="registry.example.com/dbbatch:0.1.0", shards=3)
    base.update(kw)
    return k8s.JobOptions(**base)


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


def container(job: dict) -> dict:
    [c] = job["spec"]["template"]["spec"]["containers"]
    return c


def env_of(job: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(job)["env"]}


def test_job_is_indexed_with_retry_policy_for_the_exit_codes():
    job = by_kind(k8s.render(MANIFEST, opts(shards=5, parallelism=2, backoff_limit_per_index=4)))["Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"], spec["backoffLimitPerIndex"], spec["maxFailedIndexes"]) == (5, 2, 4, 5)
    assert "backoffLimit" not in spec  # with backoffLimitPerIndex the per-index limit is the one that counts
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    by_code = {code: r["action"] for r in rules[1:] for code in r["onExitCodes"]["values"]}
    from dbbatch.core.exit_codes import INTERRUPTED, INVALID, PREEMPTED

    # SIGINT stores its checkpoint and report as SIGTERM does: both are retried without counting
    assert by_code == {PREEMPTED: "Ignore", INTERRUPTED: "Ignore", INVALID: "FailIndex"}
    assert all(r["onExitCodes"]["containerName"] == container(job)["name"] for r in rules[1:])
    # long enough to finish a step and upload a checkpoint after SIGTERM (the number is argued in k8s.py)
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 120
    env = env_of(job)
    assert env["DBBATCH_SHARD_COUNT"] == "5"
    assert container(job)["args"] == ["run", "/etc/dbbatch/manifest.yaml"]
    assert "command" not in container(job)  # the image's ENTRYPOINT (tini) stays PID 1


def test_pod_is_restricted_with_gpu_shm_and_scratch():
    job = by_kind(k8s.render(MANIFEST, opts(gpus_per_pod=4)))["Job"]
    pod = job["spec"]["template"]["spec"]
    c = container(job)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} == pod["securityContext"]["seccompProfile"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    scratch = mounts["/scratch"]
    assert "emptyDir" in volumes[scratch] and "medium" not in volumes[scratch]["emptyDir"]  # disk, not RAM
    env = env_of(job)
    for var in ("DBBATCH_WORK_DIR", "HF_HOME", "TMPDIR", "HOME", "XDG_CACHE_HOME"):
        assert env[var] == "/scratch" or env[var].startswith("/scratch/"), var
    assert volumes[mounts["/etc/dbbatch"]]["configMap"]["name"] == by_kind(k8s.render(MANIFEST, opts()))["ConfigMap"]["metadata"]["name"]


def test_cpu_only_pods_ask_for_no_gpu():
    pod = by_kind(k8s.render(MANIFEST, opts(gpus_per_pod=0)))["Job"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "tolerations" not in pod and "nodeSelector" not in pod


def test_optional_credentials_queue_and_output():
    plain = by_kind(k8s.render(MANIFEST, opts()))
    assert set(plain) == {"ConfigMap", "Job"}
    assert "serviceAccountName" not in plain["Job"]["spec"]["template"]["spec"] and "envFrom" not in container(plain["Job"])
    assert "suspend" not in plain["Job"]["spec"] and "kueue.x-k8s.io/queue-name" not in plain["Job"]["metadata"]["labels"]

    irsa = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/dbbatch"}
    objs = k8s.render(MANIFEST, opts(service_account="dbbatch-runner", service_account_annotations=irsa,
                                     secret="s3-credentials", kueue="gpu-queue", output="s3://bucket/out"))
    assert [o["kind"] for o in objs] == ["ServiceAccount", "ConfigMap", "Job"]  # apply order
    sa, job = objs[0], objs[2]
    assert sa["metadata"]["name"] == "dbbatch-runner" and sa["metadata"]["annotations"] == irsa
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "dbbatch-runner"
    assert container(job)["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue" and job["spec"]["suspend"] is True
    assert container(job)["args"][-2:] == ["--output", "s3://bucket/out"]

    # an existing ServiceAccount is used without rendering one
    objs = k8s.render(MANIFEST, opts(service_account="existing"))
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]


@pytest.mark.parametrize("text", [
    MANIFEST,
    MANIFEST.rstrip("\n"),  # no final newline
    MANIFEST + "\n\n# trailing comment with trailing spaces   \n",
    MANIFEST.replace("a photo of {token}", "ein Foto von {token} – «ünïcode»"),
])
def test_configmap_carries_the_manifest_byte_for_byte(text):
    docs = list(yaml.safe_load_all(k8s.to_yaml(k8s.render(text, opts()), "header\nline two")))
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["data"][k8s.MANIFEST_KEY] == text


@pytest.mark.parametrize("kw,flag", [
    (dict(shards=0), "--shards"), (dict(name="Bad_Name"), "--name"), (dict(namespace="a" * 64), "--namespace"),
    (dict(gpus_per_pod=-1), "--gpus-per-pod"), (dict(parallelism=9), "--parallelism"),
    (dict(max_failed_indexes=4), "--max-failed-indexes"), (dict(kueue="Q!"), "--kueue"),
    (dict(service_account_annotations={"a": "b"}), "--sa-annotation"), (dict(image=" "), "--image"),
    (dict(memory="32GB"), "--memory"), (dict(shm_size="8 Gi"), "--shm-size"), (dict(cpu="four"), "--cpu"),
])
def test_bad_options_are_named(kw, flag):
    with pytest.raises(InputError, match=flag):
        k8s.render(MANIFEST, opts(**kw))


def test_invalid_manifest_is_not_rendered():
    with pytest.raises(ManifestError):
        k8s.render(MANIFEST.replace("version: 1", "version: 7"), opts())
    with pytest.raises(InputError, match="1 MiB"):
        k8s.render(MANIFEST + "#" * (1024 * 1024), opts())


def test_job_name_from_file_name():
    assert k8s.job_name_from("My_Batch.v2") == "dbbatch-my-batch-v2"
    assert len(k8s.job_name_from("x" * 200)) <= 52 and not k8s.check_options(opts(name=k8s.job_name_from("x" * 200)))


def test_pod_warnings_flag_local_paths_and_inline_credentials():
    m = parse_manifest(MANIFEST)
    warned = "\n".join(k8s.pod_warnings(m, None))
    assert "output: '../outputs/demo' is a local path" in warned and "subjects[1].images" in warned
    assert "output:" not in "\n".join(k8s.pod_warnings(m, "s3://bucket/out"))
    remote = parse_manifest(MANIFEST.replace("demo-images/", "s3://b/imgs/").replace("../outputs/demo", "s3://b/out")
                            + "storage_options: {s3: {key: AKIA, secret: xyz, endpoint_url: 'http://x'}}\n")
    assert k8s.pod_warnings(remote, None) == [
        "storage_options.s3.key: a credential in the manifest ends up in a ConfigMap; remove it and use --secret or --service-account",
        "storage_options.s3.secret: a credential in the manifest ends up in a ConfigMap; remove it and use --secret or --service-account",
    ]


# -- schema validation ---------------------------------------------------------------------------------------

def validate_all(docs: list[dict], where: str) -> None:
    for version in K8S_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where}: {doc['kind']} invalid for Kubernetes {version}: {e.message} at {list(e.path)}")


@pytest.mark.parametrize("kw", [
    {},
    dict(gpus_per_pod=0, parallelism=1, max_failed_indexes=0),
    dict(work_queue=True, shards=3),
    dict(gpus_per_pod=8, service_account="sa", service_account_annotations={"iam.gke.io/gcp-service-account": "x@p.iam.gserviceaccount.com"},
         secret="creds", kueue="team-a", output="s3://bucket/out", node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}),
])
def test_rendered_objects_pass_strict_schema_validation(kw):
    text = k8s.to_yaml(k8s.render(MANIFEST, opts(**kw)))
    validate_all(list(yaml.safe_load_all(text)), "rendered")


def test_work_queue_pods_run_queue_mode_without_a_shard_count():
    static = by_kind(k8s.render(MANIFEST, opts(shards=3)))["Job"]["spec"]["template"]["spec"]["containers"][0]
    queued = by_kind(k8s.render(MANIFEST, opts(shards=3, work_queue=True)))["Job"]
    container = queued["spec"]["template"]["spec"]["containers"][0]
    assert "--queue" in container["args"] and "--queue" not in static["args"]
    names = lambda c: {e["name"] for e in c["env"]}  # noqa: E731
    assert "DBBATCH_SHARD_COUNT" in names(static) and "DBBATCH_SHARD_COUNT" not in names(container)
    assert queued["spec"]["completions"] == queued["spec"]["parallelism"] == 3  # one completion per pod


def test_strict_validation_catches_a_misspelt_field():
    # proves the check above can fail: strict schemas reject unknown fields
    job = by_kind(k8s.render(MANIFEST, opts()))["Job"]
    job["spec"]["backoffLimitPerIndx"] = job["spec"].pop("backoffLimitPerIndex")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[0], strict=True)


K8S_FILES = sorted(p for p in (REPO / "k8s").rglob("*") if p.suffix in (".yaml", ".yml"))


def test_k8s_folder_has_examples():
    assert len(K8S_FILES) >= 2


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_under_k8s_is_valid_and_up_to_date(path: Path):
    text = path.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    validate_all(docs, str(path.relative_to(REPO)))
    # a rendered example names the command that made it; rendering again gives the same bytes
    command = text.splitlines()[1]
    assert command.startswith("# dbbatch k8s render "), f"{path}: line 2 should be the render command"
    proc = run_cli(*shlex.split(command[len("# dbbatch "):]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text, f"{path} is stale: re-render it with `make k8s-examples`"


def test_cli_render_prints_yaml_and_warns_on_stderr():
    proc = run_cli("k8s", "render", str(DEMO), "--image", "img:1", "--shards", "2", "--namespace", "batch",
                   "--sa-annotation", "eks.amazonaws.com/role-arn=arn:aws:iam::1:role/r", "--service-account", "runner",
                   "--node-selector", "pool=gpu", "--node-selector", "zone=a")
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    assert [d["kind"] for d in docs] == ["ServiceAccount", "ConfigMap", "Job"]
    assert {d["metadata"]["namespace"] for d in docs} == {"batch"}
    job = docs[2]
    assert job["metadata"]["name"] == "dbbatch-demo"
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "gpu", "zone": "a"}
    assert "is a local path" in proc.stderr  # the demo's paths are local: a warning, not an error


@pytest.mark.parametrize("args,says", [
    (["--shards", "0"], "--shards: must be between 1 and 100000, got 0"),
    (["--shards", "2", "--sa-annotation", "novalue", "--service-account", "a"], "--sa-annotation: 'novalue' is not KEY=VALUE"),
])
def test_cli_render_errors_exit_2_with_one_line(args, says):
    proc = run_cli("k8s", "render", str(DEMO), "--image", "img:1", *args)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_render_refuses_an_invalid_manifest(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST.replace("token: sks", "token: square"))  # the class noun itself
    proc = run_cli("k8s", "render", str(bad), "--image", "img:1", "--shards", "1")
    assert proc.returncode == 2 and "subjects[0].token" in proc.stderr and proc.stdout == ""


def test_pod_warnings_flag_tracking_that_a_pod_would_lose_and_name_a_sweep_once():
    remote = MANIFEST.replace("demo-images/", "s3://b/imgs/").replace("../outputs/demo", "s3://b/out")
    assert k8s.pod_warnings(parse_manifest(remote + "tracking: {mlflow: {experiment: e, tracking_uri: 'http://mlflow:5000'}, "
                                           "wandb: {project: p}}\n"), None) == []
    warned = k8s.pod_warnings(parse_manifest(remote + "tracking: {mlflow: {experiment: e}, wandb: {project: p, mode: offline}}\n"), None)
    assert [w.split(":")[0] for w in warned] == ["tracking.wandb.mode", "tracking.mlflow.tracking_uri"]
    swept = parse_manifest("output: s3://b/out\nsubjects: [{id: rex, token: sks, class_noun: dog, images: photos/, "
                           "sweep: {train.seed: [1, 2, 3]}}]\n")
    assert [w.split(":")[0] for w in k8s.pod_warnings(swept, None)] == ["subjects[0].images"]


def test_the_readme_exit_code_table_is_every_code_with_its_job_policy():
    """Every exit code of `dbbatch run`, its meaning and the Job's action, as core/exit_codes.py says (which
    also renders the podFailurePolicy above): the table cannot drift from what the Job does."""
    import re

    from dbbatch.core.exit_codes import CODES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = {int(m.group(1)): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(r"^\| (\d+) \| (.+?) \| (.+?) \|$", table, re.M)}
    assert rows == {c.code: (c.meaning, c.job) for c in CODES}
