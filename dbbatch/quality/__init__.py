"""How well subjects came out: metrics (pure), the embedding models, scoring during training, the batch
report and its plots, and experiment tracking."""
