"""The one writer of volumes that leave SynthBrain: datasets (to a folder or a zip) and single files.

Every volume written or offered for download is one of three kinds (DESIGN.md, Provenance):

- ``synthetic``: sampled from noise by a generative model. Only this kind may say "not a person".
- ``derived``: made from a given person's scan (a reconstruction, an edit). It carries that person's
  anatomy: it is labelled derived in the NIfTI description, the sidecar, the file name and the
  viewer title, never carries the source's file name, header text or extensions (an opaque digest
  of the source voxels at most), and can never enter a release.
- ``real``: an input scan, preprocessed.

The kind is in the NIfTI description, the sidecar (``Provenance``, ``Synthetic``), the dataset's
``dataset_description.json`` and the file name (``desc-synthetic`` / ``desc-derived`` / ``desc-real``).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthbrain.errors import ConfigError
from synthbrain.io import Volume, atomic_write, json_default, to_nifti_bytes

SYNTHETIC, DERIVED, REAL = "synthetic", "derived", "real"


@dataclass(frozen=True)
class Kind:
    name: str
    description: str   # the NIfTI header's descrip (<= 79 ASCII characters)
    note: str          # the sidecar's and dataset's Note
    title: str         # how a viewer or picture names it


KINDS = {
    SYNTHETIC: Kind(SYNTHETIC, "SynthBrain SYNTHETIC T1w (not a person)",
                    "Synthetic brain MRI sampled from a generative model: not a scan of any person.",
                    "synthetic (not a person)"),
    DERIVED: Kind(DERIVED, "SynthBrain DERIVED T1w (from a person's scan)",
                  "Derived from a person's scan (a reconstruction or an edit): it carries that person's anatomy. "
                  "It is not synthetic data and must be handled like the scan it came from.",
                  "derived from a person's scan"),
    REAL: Kind(REAL, "SynthBrain REAL T1w (preprocessed input)",
               "A real scan, preprocessed onto the model's grid (resampled, intensity-normalised).",
               "real scan (preprocessed)"),
}
SYNTHETIC_NOTE = KINDS[SYNTHETIC].note


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"provenance must be one of {', '.join(KINDS)}, got {name!r}") from None


def source_digest(volume: Volume | np.ndarray) -> str:
    """An opaque id of a source scan: a hash of its voxels (no name, no header text)."""
    data = volume.data if isinstance(volume, Volume) else volume
    h = hashlib.sha256(np.ascontiguousarray(data, dtype=np.float32).tobytes())
    return "sha256:" + h.hexdigest()[:16]


def provenance_fields(name: str, source: Volume | np.ndarray | str | None = None) -> dict[str, Any]:
    """The sidecar fields that say what a volume is; a derived one names its source by digest only
    (``source``: the source volume, or its :func:`source_digest`)."""
    k = kind(name)
    out: dict[str, Any] = {"Provenance": k.name, "Synthetic": k.name == SYNTHETIC, "Note": k.note}
    if k.name == DERIVED:
        if source is None:
            raise ConfigError("a derived volume needs the volume it was derived from (for its digest)")
        out["SourceDigest"] = source if isinstance(source, str) else source_digest(source)
    return out


# Keys that could carry a source's identity (its file name, its header text); a derived or real
# sidecar never has them, whoever builds its fields.
_IDENTIFYING = ("Source", "SourceFile", "SourceName", "FileName", "Filename", "Header", "Description")


def sidecar(name: str, fields: Mapping[str, Any] | None = None,
            source: Volume | np.ndarray | str | None = None) -> dict[str, Any]:
    """A JSON sidecar: ``fields`` (conditions, seed, sampler, metrics ...) plus the provenance fields.
    Fields that already are a sidecar of the same kind pass through (their digest kept)."""
    fields = dict(fields or {})
    if fields.get("Provenance", name) != name:
        raise ConfigError(f"a {fields['Provenance']} volume cannot be written as {name}")
    source = fields.get("SourceDigest") if source is None else source
    if name != SYNTHETIC:
        bad = sorted(k for k in fields if k in _IDENTIFYING)
        if bad:
            raise ConfigError(f"a {name} volume's sidecar cannot carry {bad}: it would identify the source")
    return {**fields, **provenance_fields(name, source)}


def nifti_bytes(volume: Volume, name: str) -> bytes:
    """``volume`` as gzip NIfTI (float32, fresh header) whose description says its kind."""
    return to_nifti_bytes(volume, description=kind(name).description)


def file_stem(name: str, entities: str) -> str:
    """A BIDS-like stem with the kind as its ``desc`` entity: ``sub-x_..._desc-derived_T1w``."""
    base = entities[: -len("_T1w")] if entities.endswith("_T1w") else entities
    return f"{base}_desc-{kind(name).name}_T1w"


def dataset_description(name: str, title: str, generated_by: Mapping[str, Any]) -> dict[str, Any]:
    k = kind(name)
    return {"Name": title, "BIDSVersion": "1.9.0", "DatasetType": "derivative", "Provenance": k.name,
            "Synthetic": k.name == SYNTHETIC, "Note": k.note, "GeneratedBy": [dict(generated_by)]}


def generated_by(bundle, **extra: Any) -> dict[str, Any]:
    """BIDS GeneratedBy of a bundle's outputs: synthbrain's version, the bundle's name and checksums."""
    from synthbrain import __version__

    return {"Name": "synthbrain", "Version": __version__, "Bundle": bundle.name,
            "Checksums": {c: bundle.config.get(c, {}).get("sha256") for c in ("autoencoder", "prior")
                          if c in bundle.config}, **extra}


class DatasetWriter:
    """Writes one dataset of one kind, to a folder (each file atomically) or to a zip in memory.

    ``add`` writes a volume and its sidecar at ``<rel_dir>/<stem>.nii.gz`` / ``.json``; ``table``
    a TSV with its JSON column descriptions; ``close`` writes dataset_description.json and, for a
    zip, returns its bytes.
    """

    def __init__(self, name: str, title: str, generated: Mapping[str, Any], folder: str | Path | None = None) -> None:
        self.kind = kind(name)
        self.title, self.generated = title, dict(generated)
        self.folder = Path(folder) if folder is not None else None
        self._buf = io.BytesIO() if self.folder is None else None
        # the NIfTIs are gzipped already: store them
        self._zip = zipfile.ZipFile(self._buf, "w", compression=zipfile.ZIP_STORED) if self._buf else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _put(self, rel: str, payload: bytes | str) -> None:
        if self._zip is not None:
            self._zip.writestr(rel, payload)
        else:
            path = self.folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, payload)

    def add(self, rel_dir: str, stem: str, volume: Volume, fields: Mapping[str, Any] | None = None,
            source: Volume | np.ndarray | str | None = None) -> str:
        """Write one volume; ``stem`` is made to carry the kind (:func:`file_stem`). Returns the path
        of the NIfTI relative to the dataset."""
        stem = file_stem(self.kind.name, stem)
        side = sidecar(self.kind.name, fields, source)
        text = json.dumps(side, indent=2, sort_keys=True, default=json_default) + "\n"  # before any file
        rel = f"{rel_dir.rstrip('/')}/{stem}" if rel_dir else stem
        self._put(f"{rel}.nii.gz", nifti_bytes(volume, self.kind.name))
        self._put(f"{rel}.json", text)
        return f"{rel}.nii.gz"

    def table(self, rel: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
              descriptions: Mapping[str, Mapping[str, str]] | None = None) -> None:
        from synthbrain.data.bids import tsv_text

        self._put(rel, tsv_text(rows, columns))
        if descriptions:
            self._put(rel[: -len(".tsv")] + ".json", json.dumps(dict(descriptions), indent=2) + "\n")

    def text(self, rel: str, payload: bytes | str) -> None:
        self._put(rel, payload)

    def close(self) -> bytes | None:
        self._put("dataset_description.json",
                  json.dumps(dataset_description(self.kind.name, self.title, self.generated), indent=2) + "\n")
        if self._zip is None:
            return None
        self._zip.close()
        return self._buf.getvalue()


def single_file_zip(name: str, stem: str, volume: Volume, fields: Mapping[str, Any] | None = None,
                    source: Volume | np.ndarray | str | None = None) -> bytes:
    """One volume and its sidecar in a zip (a download button's payload)."""
    z = zipfile.ZipFile(buf := io.BytesIO(), "w", compression=zipfile.ZIP_STORED)
    stem = file_stem(name, stem)
    z.writestr(f"{stem}.nii.gz", nifti_bytes(volume, name))
    z.writestr(f"{stem}.json", json.dumps(sidecar(name, fields, source), indent=2, sort_keys=True,
                                          default=json_default) + "\n")
    z.close()
    return buf.getvalue()


def read_provenance(nifti_path: str | Path) -> str | None:
    """The kind a SynthBrain sidecar declares for a NIfTI file (None without a readable sidecar)."""
    from synthbrain.io import sidecar_path

    p = sidecar_path(nifti_path)
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict):
        return None
    # no fallback on an old "Synthetic": true: versions before 0.2 wrote it on edits of real scans too
    return d["Provenance"] if d.get("Provenance") in KINDS else None
