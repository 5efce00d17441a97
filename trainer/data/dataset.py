"""Detection samples from a COCO index and an image root (a local folder or an s3:// prefix).

A sample is addressed as ``dataset[(epoch, index)]`` (plain ``dataset[index]`` means epoch 0): the epoch travels
with the index because DataLoader workers never see ``set_epoch`` calls made in the main process, and the
augmentation of a sample is seeded from (seed, epoch, index) alone. ``__getitems__`` fetches a whole batch's
objects concurrently, so per-request latency of an object store is hidden behind the decode of the others.

A missing, truncated or undecodable image, one whose header declares more than ``max_pixels`` pixels (checked
before decoding: a 1 MB PNG can claim 30000 x 30000), or a file too large to hold such an image (refused from its
size, unread: ``image_bytes_limit``), never stops a run: the next sample takes its place (so batch
counts stay equal on every rank), it is counted in the batch's metadata and named in one warning; with
``strict=True`` it is an error naming the object instead. A bucket that does not exist or refuses access is
reported as such when the dataset is built, not as a run of unreadable images.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from trainer import storage
from trainer.annotations.image_size import image_bytes_limit, pixel_problem
from trainer.config import DEFAULT_MAX_PIXELS
from trainer.data.coco_index import CocoIndex, DataError, ImageRecord
from trainer.data.decode import DecodeError, decode_rgb
from trainer.data.tiles import Tile, TileSpec, crop_to_tile, plan_tiles, visible_fraction

log = logging.getLogger(__name__)

# torchvision 0.29 announces that torchvision.io decoding will move to TorchCodec; it still works, and it is the
# decoder this project standardises on until TorchCodec is a dependency we can pin.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

Key = int | tuple[int, int]


@dataclass
class SampleMeta:
    """What the loader's counters need to know about one sample (travels with the batch)."""

    uri: str
    fetch_seconds: float
    cache_hit: bool | None = None  # None: no cache configured
    skipped: list[str] = field(default_factory=list)  # bad objects this sample replaced


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed seed for one sample's augmentation, independent of worker and process."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ObjectSource:
    """Where image bytes come from; the cache (if any) sits here, in front of the storage layer."""

    def __init__(self, cache: Any | None = None) -> None:
        self.cache = cache

    def fetch(self, uri: str, max_bytes: int | None = None) -> tuple[bytes, bool | None]:
        """The object's bytes and whether the cache had them; larger than ``max_bytes``: storage.TooLarge."""
        if self.cache is None:
            return storage.read_bytes(uri, max_bytes=max_bytes), None
        data = self.cache.get(uri)
        if data is not None:
            return data, True
        data = storage.read_bytes(uri, max_bytes=max_bytes)
        self.cache.put(uri, data)
        return data, False


class CocoDetection(Dataset[tuple[tv_tensors.Image, dict[str, Any], SampleMeta]]):
    def __init__(self, index: CocoIndex, images_uri: str,
                 transforms: Callable[[Any, Any], tuple[Any, Any]] | None = None, *, seed: int = 0,
                 drop_empty: bool = True, strict: bool = False, fetch_threads: int = 8,
                 source: ObjectSource | None = None, max_substitutes: int = 16,
                 tiles: TileSpec | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.index = index
        self.images_uri = images_uri
        self.transforms = transforms
        self.seed = seed
        self.strict = strict
        self.fetch_threads = max(1, fetch_threads)
        self.source = source or ObjectSource()
        self.max_substitutes = max_substitutes
        self.tiles = tiles
        self.max_pixels = max_pixels
        # Like torchvision's references: images without a usable (non-crowd) box teach nothing to a detector.
        self.records: list[ImageRecord] = [r for r in index.images if not drop_empty or r.training_box_count]
        # One item per image, or per tile of an image; with drop_empty, tiles without a visible box are skipped.
        self.items: list[tuple[int, Tile | None]] = []
        for n, record in enumerate(self.records):
            if tiles is None:
                self.items.append((n, None))
                continue
            usable = record.boxes[record.iscrowd == 0]
            for tile in plan_tiles(record.width, record.height, tiles):
                if not drop_empty or (visible_fraction(usable, tile) >= tiles.min_visibility).any():
                    self.items.append((n, tile))
        if not self.items:
            raise DataError(f"{index.uri}: no images with usable boxes")
        self._check_image_root()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    def uri(self, index: int) -> str:
        return storage.join(self.images_uri, self.records[self.items[index][0]].file_name)

    def _check_image_root(self) -> None:
        """One request for the first image: a missing bucket or refused access is a problem of the whole root,
        to be named now, not discovered as every image being "unreadable" inside a loader worker."""
        if not storage.is_s3(self.images_uri):
            return
        try:
            storage.stat(self.uri(0))
        except (storage.BucketNotFound, storage.AccessDenied, storage.CredentialsError):
            raise
        except storage.StorageError:
            pass  # a missing or briefly unreachable object: the loader skips or retries it

    def read_image(self, index: int) -> torch.Tensor:
        """The decoded image of item ``index`` alone (no substitute, no target): DataError or StorageError if it
        cannot be read. ``trainer stats`` uses it, so a skipped image is not counted twice."""
        data, _, _ = self._fetch(index)
        if isinstance(data, Exception):
            raise data
        return self._decode(data, self.uri(index))

    # ----------------------------------------------------------------------------------- fetching
    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():  # never reuse a pool across fork
            self._pool = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="fetch")
            self._pool_pid = os.getpid()
        return self._pool

    def _fetch(self, index: int) -> tuple[bytes | Exception, float, bool | None]:
        started = time.perf_counter()
        try:
            data, hit = self.source.fetch(self.uri(index), image_bytes_limit(self.max_pixels))
        except storage.StorageError as exc:
            return exc, time.perf_counter() - started, None
        return data, time.perf_counter() - started, hit

    def __getitem__(self, key: Key) -> tuple[tv_tensors.Image, dict[str, Any], SampleMeta]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Key]) -> list[tuple[tv_tensors.Image, dict[str, Any], SampleMeta]]:
        pairs = [k if isinstance(k, tuple) else (0, int(k)) for k in keys]
        indices = [i for _, i in pairs]
        if len(indices) > 1 and self.fetch_threads > 1:
            fetched = dict(zip(indices, self._threads().map(self._fetch, indices), strict=True))
        else:
            fetched = {i: self._fetch(i) for i in indices}
        return [self._sample(epoch, index, fetched) for epoch, index in pairs]

    # ------------------------------------------------------------------------------------ samples
    def _sample(self, epoch: int, index: int,
                fetched: dict[int, tuple[bytes | Exception, float, bool | None]]) -> tuple[Any, Any, SampleMeta]:
        skipped: list[str] = []
        last_error: Exception | None = None
        for attempt in range(self.max_substitutes + 1):
            current = (index + attempt) % len(self)
            prefetched = fetched.pop(current, None)
            data, seconds, hit = prefetched or self._fetch(current)
            uri = self.uri(current)
            try:
                if isinstance(data, Exception):
                    raise data
                image = self._decode(data, uri)
            except (storage.StorageError, DataError) as exc:
                if self.strict:
                    raise DataError(f"{uri}: {exc}") from exc
                last_error = exc
                skipped.append(uri)
                if uri not in self._warned:
                    self._warned.add(uri)
                    log.warning("skipping unreadable image %s (%s); sample %d takes its place", uri, exc,
                                (current + 1) % len(self))
                continue
            image_t, target = self._target_for(current, image, uri)
            if self.transforms is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, epoch, current))
                    image_t, target = self.transforms(image_t, target)
            return image_t, target, SampleMeta(uri, seconds, hit, skipped)
        raise DataError(f"{self.uri(index)}: this and the next {self.max_substitutes} images are all unreadable "
                        f"(the last: {str(last_error)[:200]})")

    def _decode(self, data: bytes, uri: str) -> torch.Tensor:
        if not data:
            raise DataError("empty object")
        problem = pixel_problem(data, self.max_pixels)
        if problem is not None:
            raise DataError(problem)
        try:
            return decode_rgb(data)
        except DecodeError as exc:
            raise DataError(str(exc)) from exc

    def _target_for(self, index: int, image: torch.Tensor, uri: str) -> tuple[tv_tensors.Image, dict[str, Any]]:
        record_index, tile = self.items[index]
        record = self.records[record_index]
        height, width = image.shape[-2:]
        if (height, width) != (record.height, record.width) and uri not in self._warned:
            self._warned.add(uri)
            log.warning("%s is %dx%d but %s says %dx%d; using the image's size", uri, width, height,
                        self.index.uri, record.width, record.height)
        keep = record.iscrowd == 0  # crowd boxes are for evaluation only
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(record.boxes[keep].copy()), format="XYXY",
                                         canvas_size=(int(height), int(width)))
        target = {"boxes": boxes, "labels": torch.from_numpy(record.labels[keep].copy()),
                  "image_id": record.image_id}
        if tile is not None and self.tiles is not None:
            image, target = crop_to_tile(image, target, tile, self.tiles.min_visibility)
        return tv_tensors.Image(image), target
