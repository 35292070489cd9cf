"""The output store: fsspec I/O with retries and atomic writes, leases between workers, the layout of a
subject's files, and the fingerprints that say whether stored work is this run's."""
