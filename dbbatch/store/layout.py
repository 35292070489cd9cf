"""The names of a subject's files in the output store that say where it stands (written by batch/, read by all)."""

from __future__ import annotations

SUCCESS = "_SUCCESS"
STAGE = "_stage.json"
PHOTOS = "photos.png"
