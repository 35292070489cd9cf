"""DreamBooth's metrics (Ruiz et al. 2023, section 4.1) on embeddings, the best step, and the flags (pure).

Every function here takes embeddings (rows of a 2-D array, one per image or prompt) or evaluation points
(dicts) and returns numbers: the models that make the embeddings are in evaluators.py, the rendering and the
bookkeeping during training in scoring.py.

- dino: mean cosine similarity, over every (generated, real) pair, of self-supervised ViT embeddings of the
  token prompts' images and the subject's photos (subject fidelity).
- clip_i: the same with CLIP image embeddings.
- clip_t: mean cosine between the CLIP text embedding of each token prompt, written with the class noun in
  place of the token, and the CLIP image embedding of its image (prompt fidelity).
- class_drift: 1 - the mean cosine (CLIP image embeddings) between the bare class prompt's images now and the
  base model's images for the same seeds: how far fine-tuning moved the class (lower is better).
- pres: the paper's prior-preservation metric, mean DINO similarity between the class prompt's images and
  the subject's photos: the subject leaking into its class (lower is better).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from dbbatch.config.metric_names import LOWER_IS_BETTER, METRICS

SelectBy = Union[str, Mapping[str, float]]


def normalized(x: Any) -> np.ndarray:
    """Rows scaled to unit length (float64)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (one row each), got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norms == 0, 1.0, norms)


def mean_pairwise_cosine(a: Any, b: Any) -> float:
    """Mean cosine similarity over every (row of a, row of b) pair."""
    return float((normalized(a) @ normalized(b).T).mean())


def mean_paired_cosine(a: Any, b: Any) -> float:
    """Mean cosine similarity of row i of a with row i of b."""
    na, nb = normalized(a), normalized(b)
    if na.shape != nb.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {na.shape} and {nb.shape}")
    return float((na * nb).sum(1).mean())


def class_version(template: str, class_noun: str) -> str:
    """An evaluation prompt with the class noun in place of the token ("a photo of a {token} {class_noun} on
    red" -> "a photo of a dog on red"): the text CLIP-T compares with, which the base text encoder knows."""
    text = template.replace("{token}", "").format(class_noun=class_noun)
    return re.sub(r"\s+", " ", text).strip()


def score(gen_dino: Any = None, photo_dino: Any = None, class_dino: Any = None,
          gen_clip: Any = None, photo_clip: Any = None, text_clip: Any = None,
          class_clip: Any = None, base_class_clip: Any = None) -> dict[str, Optional[float]]:
    """The metrics of one evaluation point from its embeddings; a metric whose inputs are missing is None.

    gen_*: the token prompts' images (prompt-major, seed-minor); photo_*: the subject's photos; text_clip: the
    class versions of the token prompts, one row per generated image; class_*: the class prompt's images, one
    per seed; base_class_clip: the base model's images of the class prompt for the same seeds."""
    out: dict[str, Optional[float]] = {m: None for m in METRICS}
    if gen_dino is not None and photo_dino is not None:
        out["dino"] = mean_pairwise_cosine(gen_dino, photo_dino)
    if class_dino is not None and photo_dino is not None:
        out["pres"] = mean_pairwise_cosine(class_dino, photo_dino)
    if gen_clip is not None and photo_clip is not None:
        out["clip_i"] = mean_pairwise_cosine(gen_clip, photo_clip)
    if gen_clip is not None and text_clip is not None:
        out["clip_t"] = mean_paired_cosine(gen_clip, text_clip)
    if class_clip is not None and base_class_clip is not None:
        out["class_drift"] = 1.0 - mean_paired_cosine(class_clip, base_class_clip)
    return {k: (None if v is None else round(v, 6)) for k, v in out.items()}


def weights_of(select_by: SelectBy) -> dict[str, float]:
    """select_by as metric -> weight: a metric name is maximised (weight 1), or minimised when lower is
    better (class_drift, pres: weight -1); a mapping is a weighted sum, maximised as given."""
    if isinstance(select_by, str):
        return {select_by: -1.0 if select_by in LOWER_IS_BETTER else 1.0}
    return dict(select_by)


def describe(select_by: SelectBy) -> str:
    """select_by in words, for logs and the report: "dino", "max 1*dino + 0.5*clip_t - 1*class_drift"."""
    if isinstance(select_by, str):
        return ("min " if select_by in LOWER_IS_BETTER else "max ") + select_by
    terms = [f"{'-' if w < 0 else '+'} {abs(w):g}*{m}" for m, w in select_by.items()]
    return "max " + " ".join(terms).lstrip("+ ")


def selection_score(point: Mapping[str, Any], select_by: SelectBy) -> Optional[float]:
    """What select_by makes of one point; None when a metric it names was not computed there."""
    total = 0.0
    for metric, weight in weights_of(select_by).items():
        value = point.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        total += weight * value
    return total


def best_step(points: Sequence[Mapping[str, Any]], select_by: SelectBy) -> Optional[int]:
    """The step of the highest-scoring point (the earliest of equal ones); None when no point has a score."""
    best: Optional[tuple[float, int]] = None
    for p in points:
        s = selection_score(p, select_by)
        if s is not None and (best is None or s > best[0]):
            best = (s, int(p["step"]))
    return None if best is None else best[1]


def flags(point: Optional[Mapping[str, Any]], flag_below: Mapping[str, float],
          flag_above: Mapping[str, float], not_improved: Sequence[str] = (),
          baseline: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Why a subject needs a human: each named metric of its published point below (or, for flag_above,
    above) its threshold, as "dino 0.41 < 0.5"; each metric of `not_improved` no better than the base model's
    (`baseline`, step 0), as "dino 0.127 not above the base model's 0.145". A metric that was not computed
    there is not flagged."""
    if point is None:
        return []
    out = []
    for metric, threshold in flag_below.items():
        v = point.get(metric)
        if v is not None and v < threshold:
            out.append(f"{metric} {v:.3f} < {threshold:g}")
    for metric, threshold in flag_above.items():
        v = point.get(metric)
        if v is not None and v > threshold:
            out.append(f"{metric} {v:.3f} > {threshold:g}")
    for metric in not_improved:
        v, base = point.get(metric), (baseline or {}).get(metric)
        if v is None or base is None:
            continue
        lower = metric in LOWER_IS_BETTER
        if (v >= base) if lower else (v <= base):
            out.append(f"{metric} {v:.3f} not {'below' if lower else 'above'} the base model's {base:.3f}")
    return out


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether step is an evaluation point: every `every` steps and the last step."""
    return step > 0 and (step % every == 0 or step == max_steps)
