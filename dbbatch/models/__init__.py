"""Base models: families (families/), built-in and shipped models, loading and saving diffusers folders, what
trains per method (full, LoRA, packed LoRA) and LoRA export, seeded sampling."""
