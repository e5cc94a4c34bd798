"""Labelled images for classification and pixel pretraining: image folders and IDX files.

The readers return ``(dataset, class_names)``; ``dataset[i]`` is ``{"image": uint8 [S, S, C], "label":
int}`` with images fitted to side ``S`` and channel count ``C`` by :func:`fit_image` (``S = None``: as
stored). As ``labelled-image`` sources (``format: folder | idx``, :mod:`mmfactory.data.sources`) they
yield :class:`~mmfactory.data.samples.Samples` of images as stored; :class:`FittedImages` fits them to
the model; :func:`align_classes` maps an eval source's labels onto the training classes by name.

* :func:`read_image_folder`: ImageNet / torchvision ``ImageFolder`` layout, ``root/<class>/<image>``; classes
  are the sorted sub-folder names, images the files with an image extension (others are ignored).
* :func:`read_idx`: MNIST / Fashion-MNIST IDX files (optionally gzipped), images file + labels file.

Bad input follows the data policy (:mod:`mmfactory.data.policy`): a corrupt or missing image, or a record
cut off by a truncated IDX file, raises :class:`BadSampleError` naming the file and record, or is skipped
and counted. A file that cannot be read at all (not IDX, a broken gzip stream, headers that disagree)
raises under either policy: it has no records to skip.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mmfactory.data.media import load_image
from mmfactory.data.policy import (
    BadReason,
    BadSampleCounter,
    BadSampleError,
    BadSamplePolicy,
    DataError,
    check_policy,
)
from mmfactory.data.readers.records import Fields, RecordDataset, collect_records
from mmfactory.data.samples import Samples

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fit_image(image: np.ndarray, size: int | None, channels: int) -> np.ndarray:
    """uint8 ``[H, W]`` or ``[H, W, C]`` -> ``[size, size, channels]`` (``size=None`` keeps ``H, W``).

    Grey becomes RGB by repetition, RGB grey by ITU-R 601-2 luma (Pillow's ``L``); resizing is Pillow's
    bicubic, which filters over the source footprint when shrinking.
    """
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    pil = Image.fromarray(np.ascontiguousarray(image))
    pil = pil.convert("L" if channels == 1 else "RGB")
    if size is not None and pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    out = np.array(pil, dtype=np.uint8)
    return out[..., None] if channels == 1 else out


class ImageArrayDataset(Dataset):
    """In-memory ``images`` uint8 ``[N, S, S, C]`` and ``labels`` int64 ``[N]``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def _decode_folder_image(fields: Fields, size: int | None, channels: int) -> Fields:
    return {"image": fit_image(load_image(fields["image"]), size, channels), "label": fields["label"]}


def read_image_folder(
    root: str | Path,
    *,
    image_size: int | None = None,
    channels: int = 3,
    class_names: list[str] | None = None,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
) -> tuple[RecordDataset, list[str]]:
    """``root/<class>/<image>`` -> samples ``{"image": uint8 [S, S, C], "label": int}`` and the class names.

    ``class_names`` fixes the label of each class (pass the training set's for an eval folder); a
    sub-folder it does not name is an error. With ``check_media`` every image is decoded once here, so
    corrupt files are raised or skipped and counted before training; without it a corrupt file raises
    when its sample is loaded.
    """
    check_policy(on_bad_sample)
    root, counter = Path(root), counter if counter is not None else BadSampleCounter()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if class_names is None:
        class_names = folders
    unknown = sorted(set(folders) - set(class_names))
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among the classes {class_names}")
    if not class_names:
        raise ValueError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    items = [
        (f"{name}/{path.name}", {"image": path, "label": label})
        for label, name in enumerate(class_names)
        if (root / name).is_dir()
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    decode = partial(_decode_folder_image, size=image_size, channels=channels)
    records = collect_records(root, items, dict, decode if check_media else None, on_bad_sample, counter)
    return RecordDataset(records, decode, counter), list(class_names)


# --------------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------------


def _read_bytes(path: Path, reason: BadReason) -> bytes:
    """The file's bytes, gunzipped if it is gzip; a truncated gzip stream yields what it holds."""
    if not path.is_file():
        raise BadSampleError("file not found", reason=BadReason.MISSING_FILE, file=path)
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw)  # partial output if cut off
    except zlib.error as error:
        raise BadSampleError(f"corrupt gzip stream: {error}", reason=reason, file=path) from error


def read_idx_file(
    path: str | Path,
    *,
    reason: BadReason = BadReason.INVALID_RECORD,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
) -> tuple[np.ndarray, int]:
    """Read an IDX file: ``(array [n, *dims], declared_count)`` with ``n`` complete records.

    Records missing from a truncated file go to the policy (``"record i: truncated ..."``, ``reason``);
    a bad magic number, a cut header or bytes after the last record raise under either policy.
    """
    path, counter = Path(path), counter if counter is not None else BadSampleCounter()
    raw = _read_bytes(path, reason)

    def corrupt(problem: str) -> BadSampleError:
        return BadSampleError(problem, reason=reason, file=path)

    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_DTYPES:
        raise corrupt(f"not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim, dtype = raw[3], np.dtype(IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise corrupt(f"IDX header for {ndim} dimensions is cut off")
    count, *dims = struct.unpack(f">{ndim}I", raw[4:header])
    record_bytes = math.prod(dims) * dtype.itemsize
    complete = min(count, (len(raw) - header) // max(record_bytes, 1))
    extra = len(raw) - header - count * record_bytes
    if extra > 0:
        raise corrupt(f"{extra} bytes after the {count} records the header declares")
    for index in range(complete, count):
        held = max(0, len(raw) - header - index * record_bytes)
        problem = (
            f"truncated: {min(held, record_bytes)} of {record_bytes} bytes ({complete}/{count} records whole)"
        )
        error = BadSampleError(problem, reason=reason, file=path, record=f"record {index}")
        if on_bad_sample == "error":
            raise error
        counter.add(error)
    data = np.frombuffer(raw, dtype=dtype, count=complete * math.prod(dims), offset=header)
    return data.reshape(complete, *dims).astype(dtype.newbyteorder("=")), count


def read_idx(
    images: str | Path,
    labels: str | Path,
    *,
    image_size: int | None = None,
    channels: int | None = 1,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
) -> tuple[ImageArrayDataset, list[str]]:
    """MNIST-format ``images`` (uint8 ``[N, H, W]`` or ``[N, H, W, C]``) and ``labels`` (``[N]``) IDX files,
    gzipped or not -> samples and class names ``"0" .. str(max label)`` (``channels=None``: as stored)."""
    check_policy(on_bad_sample)
    counter = counter if counter is not None else BadSampleCounter()
    pixels, image_count = read_idx_file(
        images, reason=BadReason.CORRUPT_IMAGE, on_bad_sample=on_bad_sample, counter=counter
    )
    targets, label_count = read_idx_file(
        labels, reason=BadReason.INVALID_RECORD, on_bad_sample=on_bad_sample, counter=counter
    )
    if (
        image_count != label_count
        or pixels.ndim not in (3, 4)
        or pixels.dtype != np.uint8
        or targets.ndim != 1
    ):
        raise BadSampleError(
            f"images {pixels.dtype} {list(pixels.shape)} (declared {image_count}) and labels "
            f"{list(targets.shape)} (declared {label_count}) do not pair up as uint8 [N, H, W(, C)] and [N]",
            reason=BadReason.INVALID_RECORD,
            file=images,
        )
    n = min(len(pixels), len(targets))  # records cut from either file were counted above
    if n == 0:
        raise BadSampleError("no whole records", reason=BadReason.CORRUPT_IMAGE, file=images)
    if channels is None:
        fitted = pixels[:n]
    else:
        fitted = np.stack([fit_image(image, image_size, channels) for image in pixels[:n]])
    class_names = [str(i) for i in range(int(targets[:n].max()) + 1)]
    return ImageArrayDataset(fitted, targets[:n]), class_names


# --------------------------------------------------------------------------------------------------
# As sources
# --------------------------------------------------------------------------------------------------


def _dataset_image(dataset: Dataset, index: int) -> np.ndarray:
    return dataset[index]["image"]


def _as_samples(dataset: Dataset, classes: list[str]) -> Samples:
    labels = dataset.labels.tolist() if isinstance(dataset, ImageArrayDataset) else None
    if labels is None:
        labels = [record.fields["label"] for record in dataset.records]
    return Samples([{"label": int(y)} for y in labels], partial(_dataset_image, dataset), classes)


def read_folder_source(source, kind, bad: BadSampleCounter, counts: Counter) -> Samples:
    """``format: folder``: RGB images as stored; ``check_media`` decodes each once when read."""
    dataset, classes = read_image_folder(
        source.path, on_bad_sample=source.on_bad_sample, counter=bad, check_media=source.check_media
    )
    return _as_samples(dataset, classes)


def read_idx_source(source, kind, bad: BadSampleCounter, counts: Counter) -> Samples:
    """``format: idx``: ``path`` the images file, ``labels`` the labels file; images as stored."""
    dataset, classes = read_idx(
        source.path, source.labels, channels=None, on_bad_sample=source.on_bad_sample, counter=bad
    )
    return _as_samples(dataset, classes)


class FittedImages(Dataset):
    """``{"image": uint8 [size, size, channels], "label": int}`` of ``labelled-image`` samples."""

    def __init__(self, samples: Samples, size: int, channels: int):
        self.samples, self.size, self.channels = samples, size, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image = fit_image(self.samples.media(index), self.size, self.channels)
        return {"image": image, "label": self.samples.items[index]["label"]}


def align_classes(samples: Samples, classes: list[str], where: str) -> Samples:
    """``samples`` relabelled onto ``classes`` by class name (an eval set read on its own may lack
    classes or number them otherwise); a class that ``classes`` does not name is an error."""
    if samples.classes == classes:
        return samples
    unknown = sorted(set(samples.classes) - set(classes))
    if unknown:
        raise DataError(f"{where}: classes {unknown} are not among the training classes {classes}")
    index = {name: classes.index(name) for name in samples.classes}
    items = [{**item, "label": index[samples.classes[item["label"]]]} for item in samples.items]
    return Samples(items, samples.media, classes)
