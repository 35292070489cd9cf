"""The one small exception hierarchy. Only `dbbatch/cli.py` turns these into exit codes (core/exit_codes.py)."""

from __future__ import annotations


class DbbatchError(Exception):
    """Base class: every error a user can cause or meet. `str()` is one line that says what to do."""


class InputError(DbbatchError):
    """The manifest or an input file is wrong. Retrying will not help (exit code 2)."""


class ManifestError(InputError):
    """One or more problems in the manifest, each `path: message`, all reported together."""

    def __init__(self, problems: list[str], source: str = "manifest"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))


class ImageError(InputError):
    """A subject's image is missing, unreadable or unusable."""


class ModelError(InputError):
    """The base model cannot be found or is not a diffusers Stable Diffusion folder."""


class TrainingDiverged(DbbatchError):
    """A subject's loss or gradient became non-finite; its training stopped (packed: its slot alone)."""


class StorageError(DbbatchError):
    """Remote or local storage failed (permission, missing bucket, outage after retries)."""


class CheckpointError(DbbatchError):
    """A stored checkpoint cannot be used for this subject (another base model, corrupt file)."""


class LeaseHeld(DbbatchError):
    """Another live worker holds the subject's lease (e.g. `--force` while it is being trained)."""


class LeaseLost(DbbatchError):
    """This worker's lease on a subject expired or was taken over; it stopped without writing."""


class Preempted(DbbatchError):
    """SIGTERM arrived; state was saved and the process must exit 143 so the scheduler retries it."""
