"""Ingest: the on-disk layout users bring (FullImage/, Mask_Norm/, codes.txt) into one Zarr store (docs/contracts.md).

Two passes over the input. The header pass reads only TIFF and PNG headers, so a missing mask, a
shape mismatch or a wrong channel count stops the run within seconds; the data pass decodes the
pixels (truncated data, NaN/inf, unknown mask values) and streams the stacks into the atomic store
writer. Without ``skip_bad`` the first bad stack stops the run before anything final is written;
with it the bad stacks are listed with their reason and the rest are ingested.

Instances: an optional ``Instances/`` folder of label images (NAME.tif/.tiff/.png, 0 = background, one
id per cell, as the real development set has) is checked against the masks and kept in the store
(``stacks/<key>/instances``; root attribute ``instances: "label images"``), where training reports
per-epoch instance metrics from it. ``classes`` (``--classes background,cell,boundary``) adds the third
class Boundary to background/cell masks, derived from those label images or, without them, from the
connected components of the masks (then kept as the instances, ``instances: "connected components"``);
see boundary.py for which pixels it marks and why.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track

from cellseg.data.boundary import boundary_band, components
from cellseg.data.layouts import Layout, indexed_layout, load_layout
from cellseg.data.readers import (
    BadFileError,
    StackHeader,
    decode_mask,
    decode_stack,
    read_codes,
    read_label_image,
    read_mask_size,
    read_stack_header,
)
from cellseg.data.store import StackRecord, open_store, write_store
from cellseg.errors import BadInputError, ConfigError
from cellseg.fileio import remove_leftovers
from cellseg.locks import hold

INGEST_VERSION = 2  # part of the source fingerprint: bump when decoding rules change
STACK_DIR, MASK_DIR, CODES_FILE = "FullImage", "Mask_Norm", "codes.txt"
INSTANCE_DIR = "Instances"  # optional: label images, one id per cell
_STACK_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")
_MASK_SUFFIXES = (".png", ".tiff", ".tif")
KNOWN_CLASSES = ("background", "cell", "boundary")  # what --classes can ask for, in this order
LABEL_IMAGES, COMPONENTS = "label images", "connected components"  # the store's ``instances`` attribute


@dataclass
class IngestReport:
    out: Path
    stacks: int
    negatives: int
    layout: str
    channels: int
    content_hash: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file relative to ROOT, reason)
    unmatched_masks: list[str] = field(default_factory=list)
    removed_leftovers: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # damage found in a store built from the same sources
    reused: bool = False  # the existing complete store was built from exactly these sources
    seconds: float = 0.0
    classes: list[str] = field(default_factory=list)
    instances: str | None = None  # where the store's true cells came from, when it keeps them

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        verb = "store up to date (same sources), not rewritten:" if self.reused else "ingested"
        out = [
            f"{verb} {self.stacks} stacks ({self.negatives} negative) in {self.out} "
            f"[layout {self.layout}, {self.channels} channels] in {self.seconds:.1f} s",
            f"content hash {self.content_hash}",
        ]
        if self.instances:
            out.append(f"classes {', '.join(self.classes)}; cells kept as instances ({self.instances})")
        out += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        out += [f"ignored mask without a stack: {name}" for name in self.unmatched_masks]
        out += [f"removed leftover of an interrupted ingest: {name}" for name in self.removed_leftovers]
        out += [f"rewrote the damaged store: {damage}" for damage in self.repaired]
        return out


@dataclass(frozen=True)
class _Candidate:
    id: str
    stack: str  # ROOT-relative, '/'-separated: what messages and the manifest show
    mask: str | None
    instances: str | None = None  # its label image in Instances/, when that folder exists


def ingest(
    root: str | Path,
    out: str | Path,
    layout: str | Path | None = None,
    skip_bad: bool = False,
    progress: bool | None = None,
    wait: bool = False,
    classes: str | None = None,
) -> IngestReport:
    """Ingest ROOT (FullImage/, Mask_Norm/, codes.txt; optional Instances/) into the Zarr store ``out``.

    ``layout``: a layout name or YAML path; None accepts any channel count (channels named by
    index) as long as the stacks agree. ``progress``: show a progress bar (default: on a TTY).
    The store's lock is held from the first look at ``out`` to the end; another ingest into it
    stops with one line, or with ``wait`` waits for it. ``classes``: the store's classes as
    ``--classes`` spells them (None: codes.txt's); "background,cell,boundary" derives the Boundary class.
    """
    start = time.perf_counter()
    root, out = Path(root), Path(out)
    wanted = parse_classes(classes) if classes is not None else None
    if not root.is_dir():
        raise BadInputError(f"{root}: input folder not found")
    chosen = load_layout(layout) if layout is not None else None
    cands, unmatched, duplicates = _discover(root)
    codes = read_codes(root / CODES_FILE)
    classes, derive = store_classes(codes, wanted, root / CODES_FILE)
    with_instances = (root / INSTANCE_DIR).is_dir()
    instances = LABEL_IMAGES if with_instances else COMPONENTS if derive else None
    _check_target(out)
    with hold(out, "writing it", wait=wait):
        removed = remove_leftovers(out)  # of a killed ingest: no other ingest is writing now

        run = _Run(root, skip_bad, with_instances, derive)
        for name, reason in duplicates:
            run.bad(BadFileError(name, reason))
        good, final_layout = run.headers(cands, chosen)
        fingerprint = _fingerprint(root, cands, chosen, classes, derive)

        same = _same_sources(out, fingerprint, skip_bad)
        repaired = _damage(out) if same else []
        reused = same and not repaired
        if not reused:
            attrs = {"source_root": str(root.resolve()), "source_fingerprint": fingerprint,
                     "skipped": run.skipped}  # the data pass appends to run.skipped before attrs are written
            if instances is not None:
                attrs["instances"] = instances
            records = run.records(good, len(codes))
            show = sys.stderr.isatty() if progress is None else progress
            records = track(records, description="ingest", total=len(good), console=Console(stderr=True),
                            transient=True, disable=not show)
            write_store(out, records, final_layout, classes, attrs=attrs)
        store = open_store(out)
    return IngestReport(
        out=out,
        stacks=len(store),
        negatives=int(store.manifest["negative"].sum()),
        layout=store.layout.name,
        channels=store.layout.n_channels,
        content_hash=store.content_hash,
        skipped=sorted(tuple(s) for s in (store.attrs.get("skipped", []) if reused else run.skipped)),
        unmatched_masks=unmatched,
        removed_leftovers=removed,
        repaired=repaired,
        reused=reused,
        seconds=time.perf_counter() - start,
        classes=store.classes,
        instances=store.instances,
    )


# --- finding the inputs -----------------------------------------------------------------------


def _visible_files(folder: Path) -> list[Path]:
    """Files below ``folder`` (relative paths), except hidden ones such as macOS '._x.tif' forks."""
    return sorted(
        path.relative_to(folder)
        for path in folder.rglob("*")
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts)
    )


def _files_by_id(folder: Path, suffixes: tuple[str, ...], duplicates: list[tuple[str, str]]) -> dict[str, str]:
    """{id: path relative to ROOT} of the files below ``folder`` ending in one of ``suffixes``; the id is
    the path below ``folder`` without that suffix. A second file with the same id goes to ``duplicates``."""
    found: dict[str, str] = {}
    for rel in _visible_files(folder):
        suffix = next((s for s in suffixes if rel.name.lower().endswith(s)), None)
        if suffix is None:
            continue
        fid, source = rel.with_name(rel.name[: -len(suffix)]).as_posix(), f"{folder.name}/{rel.as_posix()}"
        if fid in found:
            duplicates.append((source, f"same stack id '{fid}' as {found[fid]}"))
        else:
            found[fid] = source
    return found


def _discover(root: Path) -> tuple[list[_Candidate], list[str], list[tuple[str, str]]]:
    """Stacks paired with masks by relative path and stem; masks without a stack; duplicate ids."""
    stacks_dir, masks_dir = root / STACK_DIR, root / MASK_DIR
    if not stacks_dir.is_dir():
        raise BadInputError(f"{root}: no {STACK_DIR}/ folder (expected {STACK_DIR}/**/NAME.ome.tif)")
    if not masks_dir.is_dir():
        raise BadInputError(f"{root}: no {MASK_DIR}/ folder (expected {MASK_DIR}/**/NAME.png)")
    duplicates: list[tuple[str, str]] = []
    masks = _files_by_id(masks_dir, _MASK_SUFFIXES, duplicates)
    stacks = _files_by_id(stacks_dir, _STACK_SUFFIXES, duplicates)
    if not stacks:
        raise BadInputError(f"{stacks_dir}: no .tif/.ome.tif stacks found")
    unmatched = sorted(m for k, m in masks.items() if k not in stacks)
    labels = _files_by_id(root / INSTANCE_DIR, _MASK_SUFFIXES, duplicates) if (root / INSTANCE_DIR).is_dir() else {}
    cands = [_Candidate(sid, source, masks.get(sid), labels.get(sid)) for sid, source in sorted(stacks.items())]
    return cands, unmatched, duplicates


# --- classes ----------------------------------------------------------------------------------


def parse_classes(text: str) -> list[str]:
    """``--classes`` as lower-case names: background,cell (the default) or background,cell,boundary."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in KNOWN_CLASSES]
    if unknown:
        raise ConfigError(f"--classes {text}: unknown class '{unknown[0]}' (known: {', '.join(KNOWN_CLASSES)})")
    if names not in (list(KNOWN_CLASSES[:2]), list(KNOWN_CLASSES)):
        raise ConfigError(f"--classes {text}: expected background,cell or background,cell,boundary (in this order)")
    return names


def store_classes(codes: list[str], wanted: list[str] | None, codes_path: Path) -> tuple[list[str], bool]:
    """(the store's classes, whether Boundary is derived): codes.txt's names, plus "Boundary" when
    ``wanted`` asks for it and the masks are background/cell."""
    lower = [c.lower() for c in codes]
    if wanted is None or lower == wanted:
        return codes, False
    if lower == list(KNOWN_CLASSES[:2]) and wanted == list(KNOWN_CLASSES):
        return [*codes, "Boundary"], True
    raise ConfigError(f"--classes {','.join(wanted)}: {codes_path} lists {', '.join(codes)}; --classes can only add "
                      "boundary to background/cell masks")


# --- the two passes ---------------------------------------------------------------------------


class _Run:
    """One ingest's passes over the candidates, and the stacks found bad so far."""

    def __init__(self, root: Path, skip_bad: bool, with_instances: bool = False, derive: bool = False):
        self.root = root
        self.skip_bad = skip_bad
        self.with_instances = with_instances  # ROOT has Instances/: every stack needs its label image
        self.derive = derive  # add the Boundary class (boundary.py)
        self.skipped: list[tuple[str, str]] = []
        self.boundary_pixels = 0

    def bad(self, exc: BadFileError) -> None:
        """Skip the file (``skip_bad``) or stop, naming it relative to ROOT."""
        name = exc.path.relative_to(self.root).as_posix() if exc.path.is_relative_to(self.root) else str(exc.path)
        if not self.skip_bad:
            raise BadFileError(name, exc.reason) from None
        self.skipped.append((name, exc.reason))

    def _header(self, cand: _Candidate, expected: int | None) -> StackHeader:
        """Everything checkable without decoding pixels."""
        stack = self.root / cand.stack
        if cand.mask is None:
            raise BadFileError(stack, f"no mask (expected {MASK_DIR}/{cand.id}.png)")
        header = read_stack_header(stack, expected)
        mask_hw = read_mask_size(self.root / cand.mask)
        if mask_hw != (header.height, header.width):
            raise BadFileError(
                self.root / cand.mask,
                f"mask is {mask_hw[0]}x{mask_hw[1]} (HxW) but its stack is {header.height}x{header.width}",
            )
        if expected is not None and header.channels != expected:
            fewer = "fewer" if header.channels < expected else "more"
            raise BadFileError(stack, f"{header.channels} channels, {fewer} than the layout's {expected}")
        if self.with_instances:
            if cand.instances is None:
                raise BadFileError(stack, f"no label image (expected {INSTANCE_DIR}/{cand.id}.tif, since "
                                          f"{INSTANCE_DIR}/ exists)")
            labels_hw = read_mask_size(self.root / cand.instances)
            if labels_hw != mask_hw:
                raise BadFileError(self.root / cand.instances,
                                   f"label image is {labels_hw[0]}x{labels_hw[1]} (HxW) but its stack is "
                                   f"{header.height}x{header.width}")
        return header

    def headers(self, cands: list[_Candidate], layout: Layout | None) -> tuple[list, Layout]:
        """Good (candidate, header) pairs and the layout; without one, the common channel count wins."""
        good = []
        for cand in cands:
            try:
                good.append((cand, self._header(cand, layout.n_channels if layout else None)))
            except BadFileError as exc:
                self.bad(exc)
        if layout is None and good:
            n = Counter(h.channels for _, h in good).most_common(1)[0][0]
            for cand, h in good:
                if h.channels != n:
                    self.bad(BadFileError(self.root / cand.stack,
                                          f"{h.channels} channels, most stacks have {n} (no --layout given)"))
            good, layout = [(c, h) for c, h in good if h.channels == n], indexed_layout(n)
        if not good:
            raise BadInputError(f"{self.root}: no good stacks to ingest ({len(self.skipped)} skipped)")
        return good, layout

    def records(self, good: list, n_classes: int) -> Iterator[StackRecord]:
        """Decoded stacks, in id order; bad ones are skipped or stop the run."""
        written = 0
        for cand, header in good:
            stack, mask = self.root / cand.stack, self.root / cand.mask
            try:
                image = decode_stack(stack, stack.read_bytes(), header)
                labels = decode_mask(mask, mask.read_bytes(), n_classes)
                cells = self._instances(cand, labels)
            except BadFileError as exc:
                self.bad(exc)
                continue
            if self.derive:
                band = boundary_band(cells)
                labels[band] = 2
                self.boundary_pixels += int(band.sum())
            written += 1
            yield StackRecord(cand.id, image, labels, source=cand.stack, instances=cells)
        if not written:
            raise BadInputError(f"{self.root}: no good stacks to ingest ({len(self.skipped)} skipped)")
        if self.derive and not self.boundary_pixels:
            where = (f"{INSTANCE_DIR}/" if self.with_instances else
                     f"{MASK_DIR}/ (no {INSTANCE_DIR}/ label images: cells are the masks' connected components, "
                     "and touching cells are one component that cannot be told apart)")
            raise BadInputError(f"--classes background,cell,boundary: no two cells touch in {where}, so the "
                                f"boundary class would be empty; add label images as {INSTANCE_DIR}/NAME.tif")

    def _instances(self, cand: _Candidate, mask: np.ndarray) -> np.ndarray | None:
        """The stack's cells as a label image (uint16, or uint32 for more ids): its Instances/ file, else
        with ``derive`` the connected components of the mask's cells, else None."""
        if not self.with_instances:
            return _compact(components(mask == 1)) if self.derive else None
        path = self.root / cand.instances
        cells = read_label_image(path)
        if cells.size and int(cells.max()) > np.iinfo(np.uint32).max:
            raise BadFileError(path, f"label id {int(cells.max())} does not fit 32 bits")
        disagree = int(np.count_nonzero((cells > 0) != (mask > 0)))
        if disagree:
            raise BadFileError(path, f"its cells and the mask {cand.mask} disagree at {disagree} pixels "
                                     "(cell in one, background in the other)")
        return _compact(cells)


def _compact(labels: np.ndarray) -> np.ndarray:
    """A label image as uint16 when its ids fit, else uint32."""
    fits = int(labels.max(initial=0)) <= np.iinfo(np.uint16).max
    return labels.astype(np.uint16 if fits else np.uint32, copy=False)


# --- target, leftovers, idempotency -----------------------------------------------------------


def _store_attrs(path: Path) -> dict | None:
    """The root ``cellseg`` attributes of a store folder (complete or not), or None."""
    try:
        doc = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    attrs = doc.get("attributes", {}).get("cellseg") if isinstance(doc, dict) else None
    return attrs if isinstance(attrs, dict) else None


def _check_target(out: Path) -> None:
    """Refuse to replace anything but a cellseg store (or an empty folder)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BadInputError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and _store_attrs(out) is None:
        raise BadInputError(f"{out}: exists and is not a cellseg store; remove it or choose another --out")


def _fingerprint(root: Path, cands: list[_Candidate], layout: Layout | None, classes: list[str],
                 derive: bool = False) -> str:
    """sha256 over every input file's bytes, the layout, the classes and the ingest version."""
    doc = {
        "ingest": INGEST_VERSION,
        "layout": layout.model_dump(mode="json") if layout else None,
        "classes": classes,
    }
    if derive:  # (absent otherwise: stores ingested before --classes keep their fingerprint)
        doc["derived"] = "boundary"
    h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
    for cand in cands:
        for rel in (cand.stack, cand.mask, cand.instances):
            if rel is not None:
                h.update(f"{rel}\0{_file_sha256(root / rel)}\0".encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _same_sources(out: Path, fingerprint: str, skip_bad: bool) -> bool:
    """The store at ``out`` is complete and was built from these exact sources with compatible options."""
    attrs = _store_attrs(out)
    if not attrs or attrs.get("complete") is not True or attrs.get("source_fingerprint") != fingerprint:
        return False
    return skip_bad or not attrs.get("skipped")


def _damage(out: Path) -> list[str]:
    """What the cheap verification finds wrong with the store (a damaged store is rewritten, not reused)."""
    try:
        return [f"stack {sid}: {reason}" for sid, reason in open_store(out).verify()]
    except BadInputError as exc:
        return [str(exc)]
