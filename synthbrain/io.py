"""NIfTI in and out: validated reads in canonical RAS+, atomic writes with a scrubbed header.

Files come from users (command line or browser upload), so reading trusts nothing: the header is
parsed from the first few hundred decompressed bytes and every check that can be made from it
(format, dimensions, dtype, geometry, declared size against the gzip trailer) runs before the voxel
data is touched; the data are then decompressed with a hard cap, so a truncated file, a gzip bomb or
a header declaring a gigantic array is refused quickly and without allocating it. Every refusal is
an ``InvalidVolumeError`` with a one-line message that starts with the file's name.

Writing never copies a header from an input: each file gets a fresh header that holds only the
geometry, the data type and our description (no names, dates or extensions from a scanner).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

from synthbrain.errors import InvalidVolumeError

MIN_DIM, MAX_DIM = 8, 1024  # voxels per spatial axis
MAX_SPACING_MM = 10.0
MAX_VOXEL_BYTES = 2 * 1024**3  # voxel data a header may declare (uncompressed)
MAX_VOX_OFFSET = 64 * 1024**2  # room for header extensions before the data
SHEAR_TOL = 1e-3  # |cos| of the angle between two voxel axes; rotations are fine, shears are not
_HEADERS = {348: nib.Nifti1Header, 540: nib.Nifti2Header}  # sizeof_hdr -> header class
_CHUNK = 1024**2  # compressed bytes read per step


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scalar image and where it lies in the world.

    ``data`` is (X, Y, Z) float32 in canonical RAS+ voxel order when it comes from ``read_volume``;
    ``affine`` (4 x 4, float64) maps voxel indices to world mm (RAS+). ``source`` is the file name it
    came from, for messages.
    """

    data: np.ndarray  # (X, Y, Z) float32
    affine: np.ndarray  # (4, 4) float64, voxel -> world mm
    source: str | None = None

    def __post_init__(self) -> None:
        name = self.source or "volume"
        data = np.asarray(self.data, dtype=np.float32)
        affine = np.asarray(self.affine, dtype=np.float64)
        if data.ndim != 3:
            raise InvalidVolumeError(f"{name}: data must be 3D (X, Y, Z), got shape {data.shape}")
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InvalidVolumeError(f"{name}: affine must be a finite 4 x 4 matrix, got shape {affine.shape}")
        # Frozen, so coerce through object.__setattr__; a no-op when the arrays are already right.
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (norms of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


# --------------------------------------------------------------------------------------------- read


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D NIfTI file (.nii or .nii.gz), validated, reoriented to canonical RAS+, as float32."""
    path = Path(path)
    compressed = _is_compressed(path.name)
    if not path.is_file():
        raise InvalidVolumeError(f"{path.name}: file not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        f = open(path, "rb")  # noqa: SIM115 -- only open() is guarded; read errors must not become 'cannot open'
    except OSError as e:
        raise InvalidVolumeError(f"{path.name}: cannot open: {e.strerror}") from e
    with f:
        return _read_stream(f, path.name, compressed)


UPLOAD_MAX_VOXELS = 64 * 1024**2  # ~0.7 mm isotropic whole head; a server must not inflate more per upload


def volume_from_bytes(data: bytes, name: str, max_voxels: int | None = UPLOAD_MAX_VOXELS) -> Volume:
    """``read_volume`` for an in-memory file (a browser upload); ``name`` decides .nii or .nii.gz.

    Nothing is written to disk. ``max_voxels`` caps what a small compressed upload may inflate to
    (each voxel becomes 4 bytes of float32, and more in temporaries).
    """
    name = Path(name).name  # an upload's name may carry a client path; messages show the name only
    return _read_stream(io.BytesIO(data), name, _is_compressed(name), max_voxels)


def _is_compressed(name: str) -> bool:
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return True
    if lower.endswith(".nii"):
        return False
    raise InvalidVolumeError(f"{name}: not a NIfTI file name; expected a .nii or .nii.gz extension")


def _failer(name: str) -> Callable[[str], InvalidVolumeError]:
    """Builds the one-line error for ``name``: 'file.nii.gz: problem'."""
    return lambda problem: InvalidVolumeError(f"{name}: " + " ".join(problem.split()))


def _read_stream(f: BinaryIO, name: str, compressed: bool, max_voxels: int | None = None) -> Volume:
    fail = _failer(name)
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        raise fail("file is empty (0 bytes)")
    f.seek(0)
    if compressed:
        if f.read(2) != b"\x1f\x8b" or size < 18:  # 18: the smallest gzip file
            raise fail("not gzip data; a .nii.gz file must be gzip-compressed NIfTI")
        f.seek(0)
        try:
            head = _gunzip_head(f, max(_HEADERS))
        except zlib.error as e:
            raise fail(f"corrupt gzip data ({e})") from e
    else:
        head = f.read(max(_HEADERS))
    shape, dtype, vox_offset, affine, (slope, inter) = _parse_header(head, fail)
    expected = vox_offset + int(np.prod(shape)) * dtype.itemsize
    if max_voxels is not None and int(np.prod(shape)) > max_voxels:
        raise fail(f"{' x '.join(map(str, shape))} voxels is more than this server accepts "
                   f"({max_voxels / 1024**2:.0f} M voxels); resample the scan first")

    if compressed:
        # The gzip trailer stores the uncompressed size mod 2**32: a cheap check against truncation
        # and bombs before decompressing anything.
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
        if isize != expected % 2**32:
            raise fail(f"gzip trailer says {isize} bytes uncompressed but the header implies {expected} "
                       "(truncated or corrupt file)")
        f.seek(0)
        raw = _gunzip_capped(f, expected, fail)
    else:
        if size < expected:
            raise fail(f"file has {size} bytes but the header implies {expected} (truncated file)")
        f.seek(0)
        raw = f.read(expected)

    values = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=vox_offset)
    # Trailing dimensions are all 1, so in Fortran order the bytes are those of the 3D volume.
    data = values.reshape(shape[:3], order="F").astype(np.float32)
    del raw, values
    if slope is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow gives inf, refused just below
            data *= np.float32(slope)
            data += np.float32(inter)
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise fail(f"{bad} of {data.size} voxels are NaN or infinite")

    # Axis flips and permutations only (what nibabel's as_closest_canonical does): no resampling.
    ornt = nib.orientations.io_orientation(affine)
    affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    data = np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))
    return Volume(data, affine, source=name)


def _parse_header(head: bytes, fail: Callable[[str], Exception]) -> tuple:
    """Header checks that need no voxel data.

    Returns (shape, dtype, vox_offset, affine, (scl_slope, scl_inter)); the slope is None when the
    header asks for no scaling.
    """
    if len(head) < 4:
        raise fail("too short to be a NIfTI file")
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    klass = next((_HEADERS[s] for s in sizes if s in _HEADERS), None)
    if klass is None or len(head) < klass.sizeof_hdr:
        raise fail("not a NIfTI file (bad header size field)")
    hdr = klass(head[: klass.sizeof_hdr], check=False)
    magic = hdr["magic"].item()[:3]  # NIfTI-2 pads its magic with a line-ending check
    if magic in (b"ni1", b"ni2"):
        raise fail("header/image pair (.hdr/.img) NIfTI is not supported; use a single .nii or .nii.gz file")
    if magic not in (b"n+1", b"n+2"):
        raise fail(f"not a NIfTI file (magic {magic!r})")

    dim = [int(d) for d in hdr["dim"]]
    if not 1 <= dim[0] <= 7 or min(dim[1 : dim[0] + 1]) < 1:
        raise fail(f"invalid dimensions in header: {dim}")
    shape = tuple(dim[1 : dim[0] + 1])
    if len(shape) < 3:
        raise fail(f"{len(shape)}D image {shape}; expected a single 3D volume")
    if any(n != 1 for n in shape[3:]):
        extra = int(np.prod(shape[3:]))
        raise fail(f"{len(shape)}D with {extra} volumes {shape}; expected a single 3D volume")
    if not all(MIN_DIM <= n <= MAX_DIM for n in shape[:3]):
        raise fail(f"shape {shape[:3]}: every spatial dimension must be within {MIN_DIM}..{MAX_DIM} voxels")

    try:
        dtype = hdr.get_data_dtype()
    except (KeyError, nib.spatialimages.HeaderDataError) as e:
        raise fail(f"unknown NIfTI datatype code {int(hdr['datatype'])}") from e
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise fail(f"unsupported data type {nib.nifti1.data_type_codes.label[int(hdr['datatype'])]}; "
                   "expected an integer or real scalar image")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes > MAX_VOXEL_BYTES:
        raise fail(f"header declares {nbytes / 1024**3:.1f} GiB of voxel data; the limit is "
                   f"{MAX_VOXEL_BYTES / 1024**3:.0f} GiB")
    offset = float(hdr["vox_offset"])  # a float32 field in NIfTI-1: NaN, infinite or fractional in a damaged file
    if not (math.isfinite(offset) and offset.is_integer() and klass.sizeof_hdr + 4 <= offset <= MAX_VOX_OFFSET):
        raise fail(f"invalid vox_offset {hdr['vox_offset']} (expected a whole number of bytes from "
                   f"{klass.sizeof_hdr + 4} to {MAX_VOX_OFFSET})")
    vox_offset = int(offset)

    try:
        affine = hdr.get_best_affine()
    except ValueError as e:  # nibabel's quaternion check
        raise fail(f"invalid qform ({e})") from e
    _check_geometry(affine, fail)
    try:
        scaling = hdr.get_slope_inter()
    except nib.spatialimages.HeaderDataError as e:
        raise fail(f"invalid intensity scaling ({e})") from e
    return shape, dtype, vox_offset, affine, scaling


def _check_geometry(affine: np.ndarray, fail: Callable[[str], Exception]) -> None:
    if not np.all(np.isfinite(affine)):
        raise fail("affine has NaN or infinite entries")
    axes = affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if not np.all((spacing > 0) & (spacing <= MAX_SPACING_MM)):
        sizes = ", ".join(f"{s:.4g}" for s in spacing)
        raise fail(f"voxel size ({sizes}) mm outside (0, {MAX_SPACING_MM:g}] mm")
    if abs(np.linalg.det(axes)) < 1e-6 * np.prod(spacing):
        raise fail("affine is singular (voxel axes are linearly dependent)")
    unit = axes / spacing
    cos = np.abs(unit.T @ unit - np.eye(3)).max()
    if cos >= SHEAR_TOL:
        raise fail(f"affine is sheared (voxel axes not orthogonal, |cos| = {cos:.3g}); only rotations "
                   "are supported")


def _gunzip_head(f: BinaryIO, n: int) -> bytes:
    """At most the first ``n`` decompressed bytes, reading only as much as needed."""
    d = zlib.decompressobj(wbits=31)  # 31: gzip wrapper
    out = b""
    while len(out) < n and not d.eof:
        chunk = d.unconsumed_tail or f.read(_CHUNK)
        if not chunk:
            break
        out += d.decompress(chunk, n - len(out))
    return out


def _gunzip_capped(f: BinaryIO, expected: int, fail: Callable[[str], Exception]) -> bytearray:
    """Decompress exactly ``expected`` bytes, never holding more than ``expected + 1``."""
    d = zlib.decompressobj(wbits=31)
    out = bytearray()
    try:
        while not d.eof:
            chunk = d.unconsumed_tail or f.read(_CHUNK)
            if not chunk:
                break
            out += d.decompress(chunk, expected + 1 - len(out))
            if len(out) > expected:
                raise fail(f"decompresses to more than the {expected} bytes the header implies")
    except zlib.error as e:
        raise fail(f"corrupt gzip data ({e})") from e
    if not d.eof or len(out) != expected:
        raise fail(f"decompresses to {len(out)} bytes but the header implies {expected} (truncated file)")
    if d.unused_data or f.read(1):
        raise fail("data after the end of the gzip stream (multi-member gzip is not supported)")
    return out


# -------------------------------------------------------------------------------------------- write


def sidecar_path(nifti_path: str | os.PathLike) -> Path:
    """The BIDS JSON sidecar beside a NIfTI file: ``sub-01_T1w.nii.gz`` -> ``sub-01_T1w.json``."""
    p = Path(nifti_path)
    stem = p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem
    return p.with_name(stem + ".json")


def to_nifti_bytes(volume: Volume, *, description: str, dtype: np.dtype | str = "float32",
                   compress: bool = True, xform_code: int = 4) -> bytes:
    """A single-file NIfTI-1 image in memory (gzip-compressed unless ``compress`` is False).

    The header is fresh: geometry, data type, ``description`` (ASCII, at most 79 characters) and
    nothing else. sform and qform are both ``volume.affine`` with ``xform_code`` (4 = MNI152).
    Integer dtypes round and clip to the dtype's range (label maps as uint8, say).
    """
    dtype = np.dtype(dtype)
    fail = _failer(volume.source or "volume")
    if dtype.kind not in "iuf":
        raise fail(f"cannot write data type {dtype}; use an integer or float type")
    # The checks read_volume makes, so that everything we write can be read back.
    _check_geometry(volume.affine, fail)
    bad = volume.data.size - int(np.count_nonzero(np.isfinite(volume.data)))
    if bad:
        raise fail(f"{bad} voxels are NaN or infinite; refusing to write them")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        data = np.clip(np.rint(volume.data), info.min, info.max).astype(dtype)
    else:
        data = volume.data.astype(dtype)

    img = nib.Nifti1Image(data, volume.affine)
    img.set_sform(volume.affine, code=xform_code)
    img.set_qform(volume.affine, code=xform_code)
    hdr = img.header
    hdr.set_data_dtype(dtype)
    hdr.set_xyzt_units(xyz="mm")
    hdr["descrip"] = description.encode("ascii", "replace")[:79]
    for field in ("db_name", "aux_file", "intent_name"):  # empty in a fresh header; kept so on purpose
        hdr[field] = b""
    raw = img.to_bytes()
    # mtime=0 makes the bytes depend on the image only
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def write_volume(path: str | os.PathLike, volume: Volume, *, description: str, sidecar: dict | None = None,
                 dtype: np.dtype | str = "float32", xform_code: int = 4) -> Path:
    """Write ``volume`` to ``path`` (.nii or .nii.gz) atomically, plus an optional JSON sidecar.

    Parent folders are created. Either the complete file appears or nothing does (an existing file
    is replaced only once the new one is complete on disk). Returns ``path``.
    """
    path = Path(path)
    compressed = _is_compressed(path.name)
    payload = to_nifti_bytes(volume, description=description, dtype=dtype, compress=compressed,
                             xform_code=xform_code)
    # Serialise the sidecar before writing anything, so a bad value leaves no half-written pair.
    text = None if sidecar is None else json.dumps(sidecar, indent=2, sort_keys=True, default=json_default)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, payload)
    if text is not None:
        atomic_write(sidecar_path(path), (text + "\n").encode("utf-8"))
    return path


def json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to a JSON sidecar")


def atomic_write(path: str | os.PathLike, payload: bytes | str) -> None:
    """Write ``payload`` (text is UTF-8 encoded) to ``path``: complete or not at all."""
    path = Path(path)
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    # Same folder, so os.replace is a rename on one file system; a hidden name so that a crash
    # leaves nothing a glob for *.nii.gz would pick up.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
