"""The stages of one subject, one collaborator each, in the order batch/subject.py runs them:

fetch (the photos) -> priors (the class latents) -> train (with evaluate scoring it) -> publish the model ->
sample -> publish the rest (config.yaml, metrics.json, `_SUCCESS` last). Each reads and writes the
SubjectContext (context.py) that SubjectRun is; none imports another stage but train, which scores through
evaluate.
"""
