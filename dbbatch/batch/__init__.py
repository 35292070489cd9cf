"""A batch of subjects: the batch loop with leases, packed cohorts, one subject's stages (stages/), prior
images, checks before a run, scratch and results."""
