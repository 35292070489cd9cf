"""Training with PyTorch Lightning: the cached-latent data, the DreamBooth module (solo and packed), the fit
loop, checkpoints mirrored to the store, DDP inside a pod, and the photos decoded for it."""
