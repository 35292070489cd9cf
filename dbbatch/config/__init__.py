"""The manifest as data (pure): schema, parsing with one-line errors, defaults merged into subjects, sweeps,
and the plans made from it alone (which subjects train together, which a shard runs)."""
