"""Fetch: the subject's photos, listed and read through storage, decoded, and stored back as `photos.png`."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from dbbatch.batch.stages.context import SubjectContext
from dbbatch.core.errors import ImageError, StorageError
from dbbatch.store.layout import PHOTOS
from dbbatch.store.locations import join

log = logging.getLogger(__name__)


class Fetch:
    def __init__(self, ctx: SubjectContext):
        self.c = ctx

    def files(self, warn: bool = False) -> list[str]:
        """The photos' URLs (image file names only; `warn` logs the others, which are skipped)."""
        from dbbatch.train.images import no_images_message, pick_image_files

        s = self.c.s
        files, skipped = pick_image_files(self.c.storage.expand(s.images), s.images)
        for url in skipped if warn else ():
            log.warning("%s: skipping %s: not an image file name", s.id, url)
        if not files:
            raise ImageError(no_images_message(s.images))
        return files

    def listing(self) -> str:
        """Digest of the photos' names, sizes and versions: tells an unchanged photo set without a download."""
        from dbbatch.store.locations import FileInfo, listing_digest

        storage = self.c.storage
        return listing_digest(FileInfo(u, i.size, i.version) for u in self.files() for i in [storage.info(u)])

    def load(self) -> list[Any]:
        """The photos decoded at the subject's resolution; sets the context's `images_digest`."""
        from dbbatch.store.fingerprints import images_digest
        from dbbatch.train.images import decode_all

        files = self.files(warn=True)
        sums: list[bytes] = []

        def read(url: str) -> bytes:
            data = self._read(url)
            sums.append(hashlib.sha256(data).digest())
            return data

        data = ((u, read(u)) for u in files)  # one file's bytes in memory at a time
        images, notes = decode_all(data, self.c.resolution)
        self.c.images_digest = images_digest(sums)
        for n in notes:
            log.warning("%s: %s", self.c.s.id, n)
        log.info("%s: %d instance image(s)", self.c.s.id, len(images))
        return images

    def _read(self, url: str) -> bytes:
        try:
            return self.c.storage.read_bytes(url)
        except StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError):  # a photo the manifest names is missing: bad input
                raise ImageError(str(e)) from e
            raise

    def store_row(self, images: list[Any]) -> None:
        """photos.png: the photos as trained on, in one row (the batch report shows them beside the grid)."""
        from dbbatch.models.sampling import make_grid
        from dbbatch.train.images import png_bytes

        self.c.holds_lease("storing photos.png")
        self.c.storage.write_bytes(join(self.c.out, PHOTOS), png_bytes(make_grid(images, len(images))))
