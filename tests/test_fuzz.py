"""Fuzzed inputs: valid NIfTI files, a bundle's config.json and a cohort's participants.tsv, mutated by
hypothesis, must give either a valid result or the project's typed error; never another exception,
never a hang, and never an allocation the input does not justify.

``SYNTHBRAIN_FUZZ_EXAMPLES=5000`` raises the number of examples of every target (CI runs the defaults
below). ``derandomize=True``: the same examples on every run, so CI cannot flake on a lucky draw.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import resource
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from synthbrain.errors import BundleError, DatasetError, InvalidVolumeError

pytestmark = pytest.mark.timeout(300)  # a hang fails the test instead of stalling the suite


def _examples(default: int) -> int:
    return int(os.environ.get("SYNTHBRAIN_FUZZ_EXAMPLES", default))


def _settings(default: int) -> settings:
    return settings(max_examples=_examples(default), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------- NIfTI

HDR = nib.nifti1.header_dtype  # the 348-byte NIfTI-1 header as a numpy structured type
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
INT16 = st.integers(-(2**15), 2**15 - 1)
DATATYPES = st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304])
# field -> values it may be given (an array field gets one element replaced)
FIELDS = {
    "sizeof_hdr": st.sampled_from([0, 348, 540, -1, 2**31 - 1, 0x5C010000]),
    "dim": st.one_of(INT16, st.sampled_from([0, 1, 2, 3, 4, 7, 8, 1024, 1025, 2000])),
    "pixdim": FLOAT32,
    "datatype": st.one_of(DATATYPES, INT16),
    "bitpix": INT16,
    "vox_offset": st.one_of(FLOAT32, st.sampled_from([0.0, 348.0, 351.0, 352.0, 353.0, 4096.0, 2.0**26, 2.0**40])),
    "scl_slope": FLOAT32,
    "scl_inter": FLOAT32,
    "qform_code": st.one_of(st.integers(0, 4), INT16),
    "sform_code": st.one_of(st.integers(0, 4), INT16),
    "quatern_b": FLOAT32, "quatern_c": FLOAT32, "quatern_d": FLOAT32,
    "qoffset_x": FLOAT32, "qoffset_z": FLOAT32,
    "srow_x": FLOAT32, "srow_y": FLOAT32, "srow_z": FLOAT32,
    "magic": st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"n+1x", b"NIFT"]),
}
# the header field -> value changes, random byte changes and cuts a mutated file is made of
HEADER_EDIT = st.sampled_from(sorted(FIELDS)).flatmap(
    lambda name: st.tuples(st.just("field"), st.just(name), st.integers(0, 7), FIELDS[name]))
BYTE_EDIT = st.tuples(st.just("byte"), st.integers(0, 2**31), st.integers(0, 255))
CUT = st.tuples(st.just("cut"), st.integers(0, 2**31))
JUNK = st.tuples(st.just("junk"), st.binary(min_size=1, max_size=64))
NIFTI_EDITS = st.lists(st.one_of(HEADER_EDIT, HEADER_EDIT, BYTE_EDIT, CUT, JUNK), min_size=1, max_size=5)
# bytes of the (possibly compressed) file a volume takes at most per byte of input: float32 data,
# its reoriented copy and the decompressed buffer, plus the fixed cost of the parse
MEMORY_PER_BYTE, MEMORY_FIXED = 64, 8 * 1024**2


def _valid_niftis() -> dict[str, bytes]:
    """Uncompressed single-file NIfTI-1 images that read_volume accepts: the project's writer (float32,
    sform + qform MNI) and nibabel's own (int16 with scaling, a flipped axis)."""
    from synthbrain.io import Volume, to_nifti_bytes

    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (16, 16, 16)).astype(np.float32)
    affine = np.array([[2.0, 0, 0, -16], [0, 2, 0, -16], [0, 0, 2, -16], [0, 0, 0, 1]])
    ours = to_nifti_bytes(Volume(data, affine), description="fuzz base", compress=False)
    img = nib.Nifti1Image(np.rint(data * 10).astype(np.int16), np.diag([-1.5, 1.5, 2.0, 1.0]))
    img.header["scl_slope"], img.header["scl_inter"] = 0.1, 5.0
    return {"ours.nii": ours, "nibabel_int16.nii": img.to_bytes()}


BASES = _valid_niftis()


def _mutate(raw: bytes, edits) -> bytes:
    buf = bytearray(raw)
    for edit in edits:
        kind = edit[0]
        if kind == "field" and len(buf) >= HDR.itemsize:
            _, name, index, value = edit
            hdr = np.frombuffer(bytes(buf[: HDR.itemsize]), dtype=HDR, count=1).copy()
            field = hdr[name]
            with np.errstate(over="ignore", invalid="ignore"):
                if field.ndim > 1:
                    field[0, index % field.shape[1]] = value
                else:
                    field[0] = value
            hdr[name] = field
            buf[: HDR.itemsize] = hdr.tobytes()
        elif kind == "byte" and buf:
            buf[edit[1] % len(buf)] = edit[2]
        elif kind == "cut":
            del buf[edit[1] % (len(buf) + 1):]
        elif kind == "junk":
            buf += edit[1]
    return bytes(buf)


def _check_volume(vol, name: str) -> None:
    from synthbrain.io import MAX_DIM, MIN_DIM, Volume

    assert isinstance(vol, Volume)
    assert vol.data.dtype == np.float32 and vol.data.ndim == 3
    assert all(MIN_DIM <= n <= MAX_DIM for n in vol.shape)
    assert np.isfinite(vol.data).all() and np.isfinite(vol.affine).all()
    assert vol.source == name


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@_settings(300)
@given(base=st.sampled_from(sorted(BASES)), edits=NIFTI_EDITS, compress=st.booleans(),
       gz_edits=st.lists(st.one_of(BYTE_EDIT, CUT, JUNK), max_size=2), from_disk=st.booleans())
def test_mutated_nifti_gives_a_volume_or_the_typed_error(fuzz_dir, base, edits, compress, gz_edits, from_disk):
    from synthbrain.io import read_volume, volume_from_bytes

    payload = _mutate(BASES[base], edits)
    name = base + (".gz" if compress else "")
    if compress:
        payload = _mutate(gzip.compress(payload, compresslevel=1, mtime=0), gz_edits)
    tracemalloc.start()
    try:
        if from_disk:
            path = fuzz_dir / name
            path.write_bytes(payload)
            vol = read_volume(path)
        else:
            vol = volume_from_bytes(payload, name)
    except InvalidVolumeError as e:
        message = str(e)
        assert message.startswith(f"{name}: ") and "\n" not in message
        event("refused")
        vol = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # numpy reports its buffers to tracemalloc, so this is every array the read made
    assert peak <= MEMORY_FIXED + MEMORY_PER_BYTE * len(payload), f"{peak} bytes for a {len(payload)}-byte file"
    if vol is not None:
        event("read")
        _check_volume(vol, name)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_a_header_declaring_a_huge_volume_is_refused_before_allocation(compress, dtype):
    """Every dtype, up to the largest shape the header checks let through, with the gzip trailer forged
    to agree with the header: refused after a few KiB, not after allocating what the header declares."""
    from synthbrain.io import MAX_DIM, volume_from_bytes

    raw = bytearray(BASES["ours.nii"])
    hdr = np.frombuffer(raw, dtype=HDR, count=1)
    hdr["dim"][0, 1:4] = MAX_DIM
    hdr["datatype"], hdr["bitpix"] = {np.dtype(np.uint8): (2, 8), np.dtype(np.int16): (4, 16),
                                      np.dtype(np.float32): (16, 32), np.dtype(np.float64): (64, 64)}[np.dtype(dtype)]
    payload = bytes(raw)
    if compress:
        packed = bytearray(gzip.compress(payload, mtime=0))
        packed[-4:] = ((352 + MAX_DIM**3 * np.dtype(dtype).itemsize) % 2**32).to_bytes(4, "little")
        payload = bytes(packed)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidVolumeError):
            volume_from_bytes(payload, "huge.nii" + (".gz" if compress else ""), max_voxels=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_FIXED + MEMORY_PER_BYTE * len(payload)


# ------------------------------------------------------------------------------------ config.json

WILD = st.one_of(
    st.sampled_from([0, -1, -(10**6), 10**6, 10**12, 10**30, 2**63, 10**400, 1e308, -1e308, 0.5, -0.5, math.nan,
                     math.inf, -math.inf, True, False, None, "", "tiny", "1e9", "NaN", [], {}, [1], [0, 0],
                     [1e9, 1e9, 1e9], [-8, 48, 32], [[1]], {"a": 1}, "\x00\u202e"]),
    st.integers(), st.floats(), st.text(max_size=8),
)


def _paths(obj, prefix=()):
    """Every key / index path into a JSON value, its containers included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _apply(cfg, path, action, value):
    if not path:
        return cfg if action != "replace" else value
    parent = cfg
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "delete":
        del parent[key]
    elif action == "replace":
        parent[key] = value
    elif action == "shorten" and isinstance(parent[key], (list, str, dict)):
        parent[key] = type(parent[key])() if isinstance(parent[key], dict) else parent[key][:-1]
    elif action == "lengthen" and isinstance(parent[key], list):
        parent[key] = parent[key] + parent[key][-1:] * 2 + [value]
    return cfg


@pytest.fixture(scope="module")
def bundle_copy(tiny_bundle, tmp_path_factory) -> tuple[Path, dict]:
    """A private copy of the tiny bundle whose config.json each example rewrites, and the original."""
    dst = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("fuzz_bundle") / "bundle")
    return dst, json.loads((dst / "config.json").read_text())


@pytest.fixture(scope="module")
def bundle_paths(bundle_copy) -> list:
    return sorted(_paths(bundle_copy[1]), key=repr)


CONFIG_EDIT = st.tuples(st.integers(0, 2**31), st.sampled_from(["replace", "replace", "delete", "shorten", "lengthen"]),
                        WILD)


@_settings(100)
@given(edits=st.lists(CONFIG_EDIT, min_size=1, max_size=3), cut=st.one_of(st.none(), st.integers(0, 2**31)))
def test_mutated_bundle_config_loads_or_gives_the_typed_error(bundle_copy, bundle_paths, edits, cut):
    from synthbrain.bundle import Bundle, load_bundle

    path, original = bundle_copy
    cfg = json.loads(json.dumps(original))
    for index, action, value in edits:
        live = sorted(_paths(cfg), key=repr) if cfg is not original else bundle_paths
        if not live:
            break
        cfg = _apply(cfg, live[index % len(live)], action, value)
        if not isinstance(cfg, (dict, list)):
            break
    text = json.dumps(cfg, indent=2)  # NaN / Infinity as Python writes them, as a hand edit might
    if cut is not None:
        text = text[: cut % (len(text) + 1)]
    (path / "config.json").write_text(text)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        bundle = load_bundle(path)
    except BundleError as e:
        assert str(e).strip() and "Traceback" not in str(e)
        event("refused")
        bundle = None
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 1024**2, f"loading a tampered config grew peak memory by {grown_kib / 1024:.0f} MiB"
    if bundle is not None:
        event("loaded")
        assert isinstance(bundle, Bundle) and bundle.autoencoder is not None
        assert bundle.grid.shape == tuple(bundle.grid.shape) and all(n > 0 for n in bundle.grid.shape)


# ------------------------------------------------------------------------------- participants.tsv

CELLS = st.one_of(
    st.sampled_from(["", " ", "n/a", "NaN", "nan", "inf", "-inf", "1e308", "1e400", "-5", "0", "65", "F", "M",
                     "x", "9" * 400, "65,5", "0x41", "\x00", "\u00e9", "\ufeff65", '"65', "65\r"]),
    st.text(max_size=12),
)
TSV_EDIT = st.one_of(
    st.tuples(st.just("cell"), st.integers(0, 2**31), st.integers(0, 2**31), CELLS),
    st.tuples(st.just("drop_column"), st.integers(0, 2**31)),
    st.tuples(st.just("rename_column"), st.integers(0, 2**31), CELLS),
    st.tuples(st.just("drop_row"), st.integers(0, 2**31)),
    st.tuples(st.just("duplicate_row"), st.integers(0, 2**31)),
    st.tuples(st.just("short_row"), st.integers(0, 2**31)),
    st.tuples(st.just("column_first"), st.integers(0, 2**31)),
)
WHOLE_FILE = st.one_of(
    st.just(b""), st.just(b"\n"), st.just(b"participant_id\tage\n"), st.binary(max_size=256),
    st.just(b"\xff\xfe" + "participant_id\tage\n".encode("utf-16-le")), st.just(b"a\tb\n" + b"x" * 200_000 + b"\n"),
)


@pytest.fixture(scope="module")
def cohort_for_fuzz(tiny_cohort, tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """A private copy of the tiny cohort (BIDSDataset reads only participants.tsv and looks for each
    T1w when it is constructed) and its participants.tsv as a table of cells."""
    root = shutil.copytree(tiny_cohort.root, tmp_path_factory.mktemp("fuzz_cohort") / "cohort")
    lines = (root / "participants.tsv").read_text().splitlines()
    return root, [line.split("\t") for line in lines]


def _edit_table(table: list[list[str]], edits) -> bytes:
    rows = [list(r) for r in table]
    for edit in edits:
        kind, at = edit[0], edit[1]
        width = len(rows[0]) if rows else 0
        if kind == "cell" and rows:
            row = rows[at % len(rows)]
            if row:
                row[edit[2] % len(row)] = edit[3]
        elif kind in ("drop_column", "rename_column") and width:
            col = at % width
            for row in rows if kind == "drop_column" else rows[:1]:
                if col < len(row):
                    if kind == "drop_column":
                        del row[col]
                    else:
                        row[col] = edit[2]
        elif kind == "drop_row" and rows:
            del rows[at % len(rows)]
        elif kind == "duplicate_row" and rows:
            rows.append(list(rows[at % len(rows)]))
        elif kind == "column_first" and width:
            col = at % width
            rows = [[r[col], *r[:col], *r[col + 1:]] if col < len(r) else r for r in rows]
        elif kind == "short_row" and rows:
            rows[at % len(rows)] = rows[at % len(rows)][:1]
    return "".join("\t".join(r) + "\n" for r in rows).encode("utf-8", "surrogatepass")


@_settings(100)
@given(edits=st.lists(TSV_EDIT, max_size=4), whole=st.one_of(st.none(), st.none(), WHOLE_FILE),
       crlf=st.booleans())
def test_mutated_participants_tsv_gives_a_dataset_or_the_typed_error(cohort_for_fuzz, edits, whole, crlf):
    from synthbrain.data.bids import BIDSDataset, schema_for_dataset

    root, table = cohort_for_fuzz
    text = whole if whole is not None else _edit_table(table, edits)
    if crlf:
        text = text.replace(b"\n", b"\r\n")
    (root / "participants.tsv").write_bytes(text)
    try:
        ds = BIDSDataset(root, grid="tiny")
    except DatasetError as e:
        assert str(e).strip()
        event("dataset refused")
    else:
        event("dataset opened")
        assert len(ds) >= 1
        for s in ds.subjects:
            assert s.t1w.is_file() and s.label.startswith("sub-")
            for c in ds.schema:
                c.validate(s.values[c.name])  # every value it kept is one the schema accepts
    try:
        schema = schema_for_dataset(root)
    except DatasetError as e:
        assert str(e).strip()
    else:
        assert all(math.isfinite(c.low) and math.isfinite(c.high) for c in schema if c.kind == "continuous")
