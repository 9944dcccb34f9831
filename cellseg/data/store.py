"""The Zarr v3 store of ingested stacks: the reader everything trains from, and its low-level writer.

Layout on disk: ``stacks/<key>/image`` uint16 (C, H, W) chunked one channel per
chunk (so reading a loading code's channels touches only those), ``stacks/<key>/mask`` uint8
class indices, per-stack attrs ``{"id", "channel_max", "ome"}`` (each stack group an NGFF 0.5
image, readable by OME-Zarr viewers), a root ``channel_max`` array (N, C) so
opening a store does not read N attribute files, ``manifest.csv`` and root attrs ``cellseg``
with ``complete: true`` written last. The writer builds the store in a temporary folder and
renames it into place, so a store either looks complete and is, or does not exist.

Optional, for stores whose cells are known one by one: ``stacks/<key>/instances``, a label image (H, W)
uint16 (uint32 beyond 65535 cells; 0 = background, one id per cell), in every stack, with the root
attribute ``instances`` saying where the cells came from ("label images", or "connected components" of
the masks). Stores without it (all stores written before it existed) simply have no instances; a
stack's content hash covers its instances when it has them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
import zarr.errors
from zarr.storage import LocalStore

from cellseg.data.layouts import Layout
from cellseg.data.schemas import MANIFEST_COLUMNS, MANIFEST_SCHEMA, read_csv, validate
from cellseg.errors import BadInputError
from cellseg.fileio import atomic_path

STORE_FORMAT = 1
MANIFEST_NAME = "manifest.csv"
# Each stack's group is also an OME-Zarr (NGFF 0.5) image of one resolution level, so NGFF viewers
# (napari-ome-zarr, ome-zarr-py) open ``stacks/<key>`` as it is; metadata only, no extra array.
NGFF_IMAGE = {"version": "0.5", "multiscales": [{
    "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
    "datasets": [{"path": "image", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}],
}]}


@dataclass(frozen=True)
class StackRecord:
    """One stack ready to store: uint16 image (C, H, W) and uint8 class-index mask (H, W)."""

    id: str
    image: np.ndarray
    mask: np.ndarray
    source: str = ""
    instances: np.ndarray | None = None  # uint16/uint32 label image (H, W), when the cells are known


def stack_hash(image: np.ndarray, mask: np.ndarray, instances: np.ndarray | None = None) -> str:
    """sha256 of the image bytes then the mask bytes (then the instance labels' bytes, when the stack has
    them) (C order): a stack's content identity."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(image).data)
    h.update(np.ascontiguousarray(mask).data)
    if instances is not None:
        h.update(np.ascontiguousarray(instances).data)
    return h.hexdigest()


def dataset_hash(layout: Layout, classes: Sequence[str], manifest: pd.DataFrame) -> str:
    """Identity of a dataset version: layout, classes and each stack's id, shape and content.

    Source paths and timestamps are left out, so moving the input folder or re-ingesting the same
    data gives the same hash.
    """
    doc = {
        "format": STORE_FORMAT,
        "layout": layout.model_dump(mode="json"),
        "classes": list(classes),
        "stacks": [
            [r.id, int(r.channels), int(r.height), int(r.width), r.content_hash]
            for r in manifest.itertuples(index=False)
        ],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stack_key(index: int) -> str:
    return f"{index:05d}"


def _check_record(rec: StackRecord, layout: Layout, classes: Sequence[str]) -> None:
    img, mask = rec.image, rec.mask
    if img.dtype != np.uint16 or img.ndim != 3:
        raise BadInputError(f"{rec.id}: image must be uint16 (C, H, W), got {img.dtype} {img.shape}")
    if img.shape[0] != layout.n_channels:
        raise BadInputError(
            f"{rec.id}: {img.shape[0]} channels, layout '{layout.name}' has {layout.n_channels}"
        )
    if mask.dtype != np.uint8 or mask.shape != img.shape[1:]:
        raise BadInputError(f"{rec.id}: mask must be uint8 {img.shape[1:]}, got {mask.dtype} {mask.shape}")
    if mask.size and int(mask.max()) >= len(classes):
        raise BadInputError(f"{rec.id}: mask value {int(mask.max())} has no class ({len(classes)} classes)")
    cells = rec.instances
    if cells is not None and (cells.dtype not in (np.uint16, np.uint32) or cells.shape != mask.shape):
        raise BadInputError(f"{rec.id}: instances must be uint16 or uint32 {mask.shape}, "
                            f"got {cells.dtype} {cells.shape}")


def write_store(
    out: str | Path,
    stacks: Iterable[StackRecord],
    layout: Layout,
    classes: Sequence[str],
    attrs: dict | None = None,
) -> Path:
    """Write ``stacks`` (in order) as a complete store at ``out``, atomically; returns ``out``.

    Computes per-channel maxima, foreground fractions and hashes itself. ``attrs`` adds entries to
    the root ``cellseg`` attributes (e.g. provenance). Any exception from ``stacks`` (a bad input
    found while reading) leaves ``out`` untouched.
    """
    out = Path(out)
    with atomic_path(out) as tmp:
        root = zarr.open_group(LocalStore(tmp), mode="w", zarr_format=3)
        root.attrs["cellseg"] = {"format": STORE_FORMAT, "complete": False}
        rows, maxima = [], []
        for index, rec in enumerate(stacks):
            _check_record(rec, layout, classes)
            key = stack_key(index)
            cmax = rec.image.reshape(rec.image.shape[0], -1).max(axis=1).astype(np.float32)
            group = root.create_group(f"stacks/{key}", attributes={"id": rec.id, "channel_max": cmax.tolist(),
                                                                   "ome": NGFF_IMAGE})
            c, h, w = rec.image.shape
            image = group.create_array("image", shape=(c, h, w), chunks=(1, h, w), dtype="uint16",
                                       compressors=None, fill_value=0, dimension_names=("c", "y", "x"))
            image[...] = rec.image
            mask = group.create_array("mask", shape=(h, w), chunks=(h, w), dtype="uint8",
                                      compressors=None, fill_value=0)
            mask[...] = rec.mask
            if rec.instances is not None:
                cells = group.create_array("instances", shape=(h, w), chunks=(h, w), dtype=rec.instances.dtype,
                                           compressors=None, fill_value=0, dimension_names=("y", "x"))
                cells[...] = rec.instances
            fg = float(np.count_nonzero(rec.mask)) / rec.mask.size
            rows.append({"id": rec.id, "key": key, "source": rec.source, "height": h, "width": w,
                         "channels": c, "layout": layout.name, "negative": fg == 0.0,
                         "foreground_fraction": fg,
                         "content_hash": stack_hash(rec.image, rec.mask, rec.instances)})
            maxima.append(cmax)
        if not rows:
            raise BadInputError(f"{out}: no stacks to write")
        manifest = validate(pd.DataFrame(rows, columns=MANIFEST_COLUMNS), MANIFEST_SCHEMA, out / MANIFEST_NAME)
        root.create_array("channel_max", data=np.stack(maxima), chunks=(len(rows), layout.n_channels),
                          compressors=None)
        manifest.to_csv(tmp / MANIFEST_NAME, index=False)
        root.attrs["omero"] = {"channels": [{"label": name} for name in layout.channel_names]}
        meta = {
            "format": STORE_FORMAT,
            "layout": layout.model_dump(mode="json"),
            "classes": list(classes),
            "content_hash": dataset_hash(layout, classes, manifest),
            **(attrs or {}),
        }
        root.attrs["cellseg"] = {**meta, "complete": True}  # last: only now does the store look complete
    return out


class Store:
    """Read access to an ingested store; arrays are opened lazily and cached per stack."""

    def __init__(self, path: Path, zstore: LocalStore, meta: dict, manifest: pd.DataFrame, channel_max: np.ndarray):
        self.path = path
        self._zstore = zstore
        self._meta = meta
        self.manifest = manifest
        self.layout = Layout.model_validate(meta["layout"])
        self.classes: list[str] = list(meta["classes"])
        self.content_hash: str = meta["content_hash"]
        self.channel_max = channel_max
        self.ids: list[str] = manifest["id"].tolist()
        self._keys: list[str] = manifest["key"].tolist()
        self._index = {sid: i for i, sid in enumerate(self.ids)}
        self._arrays: dict[tuple[int, str], zarr.Array] = {}

    @property
    def attrs(self) -> dict:
        """The root ``cellseg`` attributes (layout, classes, hash, provenance)."""
        return dict(self._meta)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, stacks={len(self)}, layout={self.layout.name!r})"

    def summary(self) -> dict:
        """What ``cellseg data info`` shows: size, negatives, layout, channels, version."""
        m = self.manifest
        return {
            "path": str(self.path),
            "stacks": len(self),
            "negatives": int(m["negative"].sum()),
            "layout": self.layout.name,
            "channels": self.layout.channel_names,
            "classes": self.classes,
            "height": [int(m["height"].min()), int(m["height"].max())],
            "width": [int(m["width"].min()), int(m["width"].max())],
            "content_hash": self.content_hash,
            **({"instances": self.instances} if self.instances else {}),  # where its true cells came from
        }

    def index(self, stack_id: str) -> int:
        """Position of a stack id; BadInputError naming the id if absent."""
        try:
            return self._index[stack_id]
        except KeyError:
            raise BadInputError(f"{self.path}: no stack with id '{stack_id}'") from None

    def _array(self, i: int, name: str) -> zarr.Array:
        if not 0 <= i < len(self):
            raise IndexError(f"stack index {i} out of range for {len(self)} stacks")
        cached = self._arrays.get((i, name))
        if cached is None:
            cached = zarr.open_array(self._zstore, path=f"stacks/{self._keys[i]}/{name}", mode="r")
            self._arrays[(i, name)] = cached
        return cached

    def shape(self, i: int) -> tuple[int, int, int]:
        row = self.manifest.iloc[int(i)]
        return int(row["channels"]), int(row["height"]), int(row["width"])

    def read_image(self, i: int, channels: Sequence[int] | None = None) -> np.ndarray:
        """uint16 (len(channels), H, W) in the order given; reads only those channels' chunks."""
        arr = self._array(int(i), "image")
        n = arr.shape[0]
        idx = list(range(n)) if channels is None else [int(c) for c in channels]
        bad = [c for c in idx if not 0 <= c < n]
        if bad:
            raise IndexError(f"channels {bad} out of range for a {n}-channel stack")
        if _plain_chunks(arr):
            return np.stack([self._read_plain_chunk(int(i), "image", arr, (c, 0, 0)) for c in idx])
        return arr.get_orthogonal_selection((idx, slice(None), slice(None)))

    def read_mask(self, i: int) -> np.ndarray:
        arr = self._array(int(i), "mask")
        return self._read_plain_chunk(int(i), "mask", arr, (0, 0)) if _plain_chunks(arr) else arr[...]

    @property
    def instances(self) -> str | None:
        """Where the store's true cells came from ("label images", "connected components"), or None when
        it keeps none (``read_instances`` then has nothing to read)."""
        return self._meta.get("instances") or None

    def read_instances(self, i: int) -> np.ndarray:
        """The stack's label image (uint16/uint32 (H, W), 0 = background); only for a store with ``instances``."""
        if not self.instances:
            raise BadInputError(f"{self.path}: the store keeps no instance labels (ingest a folder with Instances/)")
        arr = self._array(int(i), "instances")
        return self._read_plain_chunk(int(i), "instances", arr, (0, 0)) if _plain_chunks(arr) else arr[...]

    def _chunk_file(self, i: int, name: str, arr: zarr.Array, coords: tuple[int, ...]) -> tuple[Path, str]:
        key = arr.metadata.encode_chunk_key(coords)
        return self.path / "stacks" / self._keys[i] / name / key, f"{name} chunk {key}"

    def _read_plain_chunk(self, i: int, name: str, arr: zarr.Array, coords: tuple[int, ...]) -> np.ndarray:
        """One chunk read straight from its file (see ``_plain_chunks``); zarr-python's per-chunk
        machinery costs more than the read itself and made streaming slower than reading TIFFs."""
        path, what = self._chunk_file(i, name, arr, coords)
        shape = arr.chunks[-2:]  # one plane
        try:
            data = np.fromfile(path, dtype=arr.dtype.newbyteorder("<"))
        except FileNotFoundError:  # zarr writes no chunk that is all fill value
            return np.full(shape, arr.metadata.fill_value, dtype=arr.dtype)
        if data.size != math.prod(shape):
            raise BadInputError(f"{self.path}: stack {self.ids[i]} is damaged ({what} has {data.nbytes} bytes, "
                                f"expected {math.prod(shape) * arr.dtype.itemsize}); re-run `cellseg data ingest`")
        return data.reshape(shape).astype(arr.dtype, copy=False)

    def verify(self, deep: bool = False) -> list[tuple[str, str]]:
        """(id, what is wrong) for every damaged stack; BadInputError if the manifest itself is damaged.

        Cheap: both arrays open with the manifest's shape and every chunk file has the size its shape
        and dtype imply, or is absent where the stack is all zero (channel maximum 0, negative mask);
        arrays written by other tools are decoded instead. ``deep`` also recomputes each stack's
        content hash against the manifest, which catches damage that keeps the sizes.
        """
        if dataset_hash(self.layout, self.classes, self.manifest) != self.content_hash:
            raise BadInputError(f"{self.path}: {MANIFEST_NAME} does not match the store's content hash "
                                "(edited or damaged); re-run `cellseg data ingest`")
        found = []
        for i, sid in enumerate(self.ids):
            try:
                reason = self._damage(i, deep)
            except Exception as exc:  # noqa: BLE001 - zarr raises many types on damaged metadata or chunks
                first = str(exc).strip().partition("\n")[0]
                reason = f"unreadable ({type(exc).__name__}: {first})"
            if reason:
                found.append((sid, reason))
        return found

    def _damage(self, i: int, deep: bool) -> str | None:
        image, mask = self._array(i, "image"), self._array(i, "mask")
        c, h, w = self.shape(i)
        if image.shape != (c, h, w) or mask.shape != (h, w):
            return f"arrays of shape {image.shape} and {mask.shape}, the manifest says {(c, h, w)}"
        cells = self._array(i, "instances") if self.instances else None
        if cells is not None and cells.shape != (h, w):
            return f"instances of shape {cells.shape}, the manifest says {(h, w)}"
        if _plain_chunks(image) and _plain_chunks(mask) and (cells is None or _plain_chunks(cells)):
            chunks = [(image, "image", (k, 0, 0), self.channel_max[i, k] > 0) for k in range(c)]
            chunks.append((mask, "mask", (0, 0), not self.manifest["negative"].iat[i]))
            if cells is not None:
                chunks.append((cells, "instances", (0, 0), not self.manifest["negative"].iat[i]))
            for arr, name, coords, written in chunks:
                path, what = self._chunk_file(i, name, arr, coords)
                want = math.prod(arr.chunks[-2:]) * arr.dtype.itemsize
                size = path.stat().st_size if path.is_file() else None
                if size is None and written:
                    return f"{what} is missing"
                if size is not None and size != want:
                    return f"{what} has {size} bytes, expected {want}"
        else:  # arrays written by other tools: decoding every chunk is the check (raises if damaged)
            self.read_image(i)
            self.read_mask(i)
            if cells is not None:
                self.read_instances(i)
        if deep:
            truth = self.read_instances(i) if cells is not None else None
            if stack_hash(self.read_image(i), self.read_mask(i), truth) != self.manifest["content_hash"].iat[i]:
                return "content differs from its hash in the manifest"
        return None


def _plain_chunks(arr: zarr.Array) -> bool:
    """True for the arrays ``write_store`` writes: Zarr v3, uncompressed little-endian bytes, one chunk
    per channel plane. Anything else (a store written by other tools) is read through zarr."""
    from zarr.codecs import BytesCodec

    codecs = getattr(arr.metadata, "codecs", ())
    return (arr.metadata.zarr_format == 3 and len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == "little")
            and tuple(arr.chunks[-2:]) == tuple(arr.shape[-2:]) and all(c == 1 for c in arr.chunks[:-2]))


def open_store(path: str | Path) -> Store:
    """Open an ingested store; BadInputError (one line) if it is missing, incomplete or invalid."""
    path = Path(path)
    if not path.is_dir():
        raise BadInputError(f"{path}: store not found (create it with `cellseg data ingest`)")
    zstore = LocalStore(path, read_only=True)
    try:
        root = zarr.open_group(zstore, mode="r", zarr_format=3)
        meta = dict(root.attrs.get("cellseg") or {})
    except (zarr.errors.GroupNotFoundError, FileNotFoundError, ValueError, KeyError) as exc:
        raise BadInputError(f"{path}: not a cellseg Zarr store ({type(exc).__name__})") from None
    if not meta:
        raise BadInputError(f"{path}: not a cellseg store (no 'cellseg' attributes)")
    if meta.get("complete") is not True:
        raise BadInputError(f"{path}: store is incomplete (interrupted ingest?); run `cellseg data ingest` again")
    if meta.get("format") != STORE_FORMAT:
        raise BadInputError(f"{path}: unsupported store format {meta.get('format')!r} (expected {STORE_FORMAT})")
    manifest = read_csv(path / MANIFEST_NAME, MANIFEST_SCHEMA)
    try:
        channel_max = np.asarray(zarr.open_array(zstore, path="channel_max", mode="r")[...], dtype=np.float32)
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError) as exc:
        raise BadInputError(f"{path}: store has no channel_max array ({type(exc).__name__})") from None
    if channel_max.shape[0] != len(manifest):
        raise BadInputError(f"{path}: channel_max has {channel_max.shape[0]} rows, manifest has {len(manifest)}")
    return Store(path, zstore, meta, manifest, channel_max)
