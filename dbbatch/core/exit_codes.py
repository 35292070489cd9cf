"""`dbbatch run`'s exit codes, what each means, and what the Kubernetes Job does with it.

`dbbatch/cli.py` is the only place errors become these codes; deploy/k8s.py renders the Job's
podFailurePolicy from JOB_ACTIONS, and the README's exit-code table is checked against CODES.
"""

from __future__ import annotations

from dataclasses import dataclass

OK, FAILED, INVALID, STORAGE, INTERRUPTED, PREEMPTED = 0, 1, 2, 3, 130, 143


@dataclass(frozen=True)
class ExitCode:
    code: int
    meaning: str
    job: str  # the Job's podFailurePolicy action: Ignore (retried, not counted), FailIndex, Count (the default)


CODES = (
    ExitCode(OK, "every selected subject succeeded or was already done", "Succeeded: the index is complete"),
    ExitCode(FAILED, "at least one subject failed (see the table and the report), or an unexpected error", "Count"),
    ExitCode(INVALID, "invalid manifest or input (every subject attempted failed for bad input; subjects already done "
                      "do not count)", "FailIndex"),
    ExitCode(STORAGE, "the output / prior cache cannot be written or reached (credentials, bucket, permissions, an outage "
                      "longer than the retries)", "Count"),
    ExitCode(INTERRUPTED, "interrupted by SIGINT (Ctrl-C), whenever it came: like 143, a checkpoint of the current step "
                          "and the run report are stored", "Ignore"),
    ExitCode(PREEMPTED, "preempted by SIGTERM, whenever it came: a checkpoint of the current step is stored", "Ignore"),
)

# The podFailurePolicy rules' actions (a pod disrupted by Kubernetes itself is Ignored too, by its condition):
# Ignore retries the index without counting it against backoffLimitPerIndex (a checkpoint is stored and the
# rerun resumes it), FailIndex stops retrying an index that cannot succeed, any other code counts.
JOB_ACTIONS = {action: tuple(c.code for c in CODES if c.job == action) for action in ("Ignore", "FailIndex")}
