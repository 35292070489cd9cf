"""dbbatch: DreamBooth fine-tuning of Stable Diffusion for many subjects, as a batch job."""

__version__ = "0.1.0"
