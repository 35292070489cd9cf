#!/usr/bin/env bash
# Build the dbbatch image from ./Dockerfile with podman (no Docker engine needed) and run the demo manifest in
# it the way a cluster would: numeric non-root user, read-only root filesystem, no capabilities, no network.
#
#   sudo scripts/podman_build_run.sh        (root: installs packages, rootful podman)
#
# The base image is Debian bookworm made with debootstrap (so nothing is pulled from a container registry),
# and torch comes from the machine's pip find-links folder (a CPU wheel) via a constraints file, instead of
# the default CUDA base image. Work files live in $DBBATCH_PODMAN_DIR (default /var/tmp/dbbatch-podman);
# the base image and the build's layers are reused by later runs. Prints image size, build and run times.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${DBBATCH_PODMAN_DIR:-/var/tmp/dbbatch-podman}
BASE=localhost/dbbatch-base:bookworm
IMAGE=${DBBATCH_IMAGE:-localhost/dbbatch:dev}
UID_GID=10001:10001  # the Dockerfile's user
CONSTRAINTS=$REPO/constraints.txt  # pins torch==2.13.0, which resolves to the local CPU wheel

step() { printf '\n== %s\n' "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

step "tools"
missing=()
for tool in podman buildah debootstrap newuidmap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  echo "missing: ${missing[*]}; installing podman buildah debootstrap uidmap runc"
  [[ $(id -u) == 0 ]] || { echo "run as root (apt-get install, rootful podman)" >&2; exit 1; }
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah debootstrap uidmap runc
fi
podman --version
mkdir -p "$STATE"
# one run at a time on a machine (they share $STATE, the base image and the tag)
exec 9>"$STATE/lock"
flock 9

step "base image $BASE"
if podman image exists "$BASE"; then
  echo "exists (podman rmi $BASE to rebuild it)"
else
  # The Debian mirror apt already uses here (deb822 `URIs:` or one-line `deb` entries), else the public one.
  mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ { print $2 } /^deb / { print ($2 ~ /^\[/ ? $3 : $2) }' \
    /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | grep -m1 -E '/debian/?$' || true)}
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "debootstrap from $mirror"
  started=$(now)
  rm -rf "$STATE/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$STATE/rootfs" "$mirror" \
    > "$STATE/debootstrap.log" 2>&1 || { tail -20 "$STATE/debootstrap.log" >&2; exit 1; }
  tar -C "$STATE/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$STATE/rootfs"
  echo "base image made in $(since "$started")s"
fi

step "build $IMAGE"
# pip inside the build: this machine's CA bundle (its HTTPS may pass a proxy with its own CA), and the
# find-links folder holding the CPU torch wheel, so that torch==2.13.0 resolves to it and not to CUDA builds.
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
find_links=${PIP_FIND_LINKS:-$(pip3 config get global.find-links 2>/dev/null || true)}
find_links=${find_links:-/opt/wheels}
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\nfind-links = %s\n' "$find_links" > "$STATE/pip.conf"
mounts=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro" -v "$STATE/pip.conf:/etc/pip.conf:ro"
        -v "$CONSTRAINTS:/build/constraints.txt:ro")
[[ -d $find_links ]] && mounts+=(-v "$find_links:$find_links:ro")
started=$(now)
podman build --isolation=chroot --network=host \
  --build-arg BASE_IMAGE="$BASE" --build-arg PIP_CONSTRAINT_FILE=/build/constraints.txt \
  "${mounts[@]}" -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO"
build_s=$(since "$started")
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "built in ${build_s}s"

step "checks"
# podman's default rlimits (nofile 1048576) can exceed this machine's hard limits, and root here may lack
# CAP_SYS_RESOURCE to raise them, so runc fails with "error setting rlimit": ask for what the host allows.
limit() { local v; v=$(ulimit -H "$1"); [[ $v == unlimited ]] && v=-1; ((v < 0 || v > $2)) && v=$2; echo "$v:$v"; }
# --read-only: the root filesystem cannot be written, even by the image's own user
run_flags=(--runtime runc --read-only --cap-drop=ALL --security-opt no-new-privileges --user "$UID_GID" --network none
           --ulimit "nofile=$(limit -n 1048576)" --ulimit "nproc=$(limit -u 32768)")
echo "entrypoint: $(podman image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")  user: $(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
podman run --rm "${run_flags[@]}" --entrypoint /bin/sh "$IMAGE" -c 'id; touch /opt/x 2>&1 | sed "s/^/root fs: /"'
echo "dbbatch version: $(podman run --rm "${run_flags[@]}" "$IMAGE" version)"

step "demo: dbbatch run /manifests/demo.yaml"
run=$STATE/run
rm -rf "$run" && mkdir -p "$run/manifests" "$run/outputs" "$run/scratch"
cp "$REPO/manifests/demo.yaml" "$run/manifests/"
chown -R "$UID_GID" "$run"
# the demo's photos, drawn by the image's own Python (it has Pillow)
podman run --rm "${run_flags[@]}" -v "$run/manifests:/manifests" -v "$REPO/scripts:/scripts:ro" \
  --entrypoint python "$IMAGE" /scripts/make_demo_images.py /manifests/demo-images
# demo.yaml's output is ../outputs/demo, relative to the manifest: /outputs/demo in the container
started=$(now)
volumes=(-v "$run/manifests:/manifests:ro" -v "$run/outputs:/outputs" -v "$run/scratch:/scratch")
podman run --rm "${run_flags[@]}" "${volumes[@]}" "$IMAGE" run /manifests/demo.yaml
run_s=$(since "$started")
for subject in rex tom; do
  test -e "$run/outputs/demo/$subject/_SUCCESS" || { echo "no $run/outputs/demo/$subject/_SUCCESS" >&2; exit 1; }
done
echo "outputs:"; (cd "$run/outputs" && find demo -maxdepth 2 | sort | sed 's/^/  /')

step "preemption: podman stop during training (SIGTERM -> tini -> dbbatch), then resume"
# what Kubernetes does to a pod it evicts: SIGTERM to PID 1, SIGKILL after the grace period
cid=$(podman run -d "${run_flags[@]}" "${volumes[@]}" "$IMAGE" run /manifests/demo.yaml --only rex --force)
for _ in $(seq 600); do podman logs "$cid" 2>&1 | grep -q "rex train" && break; sleep 1; done
podman top "$cid" pid user args  # PID 1 is tini, dbbatch its child
started=$(now)
podman stop -t 120 "$cid" >/dev/null
stop_s=$(since "$started")
code=$(podman inspect --format '{{.State.ExitCode}}' "$cid")
podman logs "$cid" 2>&1 | tail -4
podman rm "$cid" >/dev/null
echo "exit code $code, ${stop_s}s from SIGTERM to exit"
[[ $code == 143 ]] || { echo "expected exit 143 after SIGTERM" >&2; exit 1; }
ls "$run/outputs/demo/rex/checkpoints/"*.ckpt >/dev/null || { echo "no checkpoint stored on SIGTERM" >&2; exit 1; }
podman run --rm "${run_flags[@]}" "${volumes[@]}" "$IMAGE" run /manifests/demo.yaml 2>&1 | grep -E "resum|skip|rex|tom" | grep -v "priors\|train [0-9]" | tail -6
test -e "$run/outputs/demo/rex/_SUCCESS" || { echo "rex did not finish after the resume" >&2; exit 1; }

step "summary"
echo "image:      $IMAGE ($(awk -v b="$size" 'BEGIN { printf "%.0f MB", b / 1e6 }'))"
echo "build:      ${build_s}s"
echo "demo run:   ${run_s}s (user $UID_GID, read-only root filesystem, --cap-drop=ALL, --network none)"
echo "preemption: exit $code, ${stop_s}s from SIGTERM to exit; the rerun resumed rex and finished it"
