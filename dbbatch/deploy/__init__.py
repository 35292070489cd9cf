"""Deployment: the Kubernetes objects (ConfigMap, Indexed Job) for a batch."""
