"""The evaluation metrics a manifest may name (`evaluation.select_by`, flags) and what each needs (pure).

What they measure, and the functions that compute them, are in quality/evaluation.py.
"""

METRICS = ("dino", "clip_i", "clip_t", "class_drift", "pres")
LOWER_IS_BETTER = frozenset({"class_drift", "pres"})
# metric -> the evaluation model it needs (evaluation.clip or evaluation.dino)
NEEDS = {"dino": "dino", "pres": "dino", "clip_i": "clip", "clip_t": "clip", "class_drift": "clip"}
