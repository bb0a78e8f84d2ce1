"""Results as the pages keep and show them: a generated sample with what was measured on it and its
display files, a reconstruction with its display files. Built once per result (in the page's
session state or, for built-in scans, a shared cache), then drawn on every rerun for free."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from app_support.viewer import Layer, Panel, Surface
from synthbrain.errors import InvalidVolumeError
from synthbrain.export import DERIVED, REAL, SYNTHETIC, kind
from synthbrain.io import Volume
from synthbrain.viz.display import display_bytes

DIFF_COLORMAPS = ("warm", "winter")  # positive (reconstruction brighter), negative (darker)
DIFF_COLORBAR = "reconstruction − original, intensity (0..1 scale): warm brighter, cool darker"
GALLERY = "gen_gallery"              # session state: this session's samples (GalleryItem), newest last
WHOLE_HEAD_SURFACE = ("3D: the outer surface of the head (this model makes whole heads with skull and scalp; brain "
                      "and ventricles are not segmented in them)")
INTENSITY = "intensity (0..1, normalised)"  # what the viewer's readout calls a base image's value
# the measured masks as overlays: (label, colormap, opacity, colour-bar text)
MASKS = (("brain (measured)", "green", 0.25,
          "brain: share of each voxel counted as brain tissue (0..1); summed x voxel volume = brain volume (mL)"),
         ("ventricles (measured)", "warm", 0.9,
          "ventricles: voxels counted as lateral + third ventricle (1); their number x voxel volume = "
          "ventricular volume (mL)"))


def measure_for_display(volume: Volume, bundle) -> tuple[dict | None, str | None, tuple[bytes, ...]]:
    """(brain, ventricular and intracranial volume in mL, None, the measured brain and ventricle maps
    as display files) of ``volume`` on ``bundle``'s grid, or (None, why not, ()). One segmentation gives
    both; only its small display files are kept. A whole-head bundle's volumes are not measured."""
    from synthbrain.data.preprocess import WHOLE_HEAD_UNMEASURED, is_whole_head
    from synthbrain.measure import segment
    from synthbrain.viz.display import display_nifti_bytes

    if is_whole_head(bundle.config.get("intensity")):  # its skull would be counted as brain
        return None, WHOLE_HEAD_UNMEASURED, ()
    try:
        seg = segment(volume, bundle.grid)
    except InvalidVolumeError as e:
        return None, str(e), ()
    m = seg.measurement
    masks = tuple(display_nifti_bytes(Volume(data, seg.grid.affine), f"SynthBrain measured {name} (display)")
                  for data, name in ((seg.brain, "brain"), (seg.ventricles, "ventricles")))
    return {"brain_volume": m.brain_volume, "ventricular_volume": m.ventricular_volume,
            "intracranial_volume": m.intracranial_volume}, None, masks


def mask_layers(masks: tuple[bytes, ...]) -> tuple[Layer, ...]:
    """Measured brain and ventricle maps (display files) as overlays with their colour bars."""
    return tuple(Layer(data, name=f"{label.split()[0]}_mask.nii.gz", label=label, colormap=cmap, opacity=alpha,
                       cal_min=0.05, cal_max=1.0, colorbar=bar)
                 for data, (label, cmap, alpha, bar) in zip(masks, MASKS))


# what the measured volumes are called in tables
VOLUME_LABELS = {"brain_volume": "Brain (grey + white matter)", "ventricular_volume": "Ventricles (lateral + third)",
                 "intracranial_volume": "Intracranial (the head mask)"}


def base_layer(display: bytes, name: str, label: str = INTENSITY) -> Layer:
    # volumes are normalised to [0, 1]; one fixed window keeps panels and samples comparable
    return Layer(display, name=name, label=label, cal_min=0.0, cal_max=0.9)


# ------------------------------------------------------------------------------------- generation


@dataclass(eq=False)
class GalleryItem:
    """One sample of this session. Only the display file is made with the sample; what is measured
    on it, its surfaces and its thumbnail are made the first time the page asks for them (so the
    slices are on screen before the 3D view is built) and then kept."""

    number: int
    sample: object                 # synthbrain.sampling.Sample
    bundle: object = field(repr=False)
    display: bytes = b""           # gzip NIfTI for the viewer
    made_at: str = ""              # local clock time it was made, "14:03:12"

    @property
    def volume(self) -> Volume:
        return self.sample.volume

    @cached_property
    def _measured(self) -> tuple[dict | None, str | None, tuple[bytes, ...]]:
        """(volumes in mL, None, the measured brain and ventricle maps as display files) or
        (None, why not, ())."""
        return measure_for_display(self.volume, self.bundle)

    @property
    def measurement(self) -> tuple[dict | None, str | None]:
        """({brain_volume, ventricular_volume, intracranial_volume} in mL, None) or (None, why not)."""
        return self._measured[:2]

    def mask_layers(self) -> tuple[Layer, ...]:
        """What was measured, as overlays (the viewer's toolbar hides each and sets their opacity)."""
        return mask_layers(self._measured[2])

    @property
    def measured(self) -> dict | None:
        return self.measurement[0]

    @property
    def measure_error(self) -> str | None:
        return self.measurement[1]

    @property
    def sidecar(self) -> dict:
        from synthbrain.sampling import sample_sidecar

        measured = {f"{k}_mL": v for k, v in self.measured.items()} if self.measured else {"error": self.measure_error}
        return sample_sidecar(self.sample, self.bundle, {"Measured": measured})

    @cached_property
    def surface_set(self) -> tuple[tuple[Surface, ...], str | None]:
        """(brain and ventricle surfaces for the viewer, a note when the ventricles were not found); for a
        whole-head model, the head's outer surface (a brain segmentation would take the skull for brain)."""
        from synthbrain.data.preprocess import is_whole_head
        from synthbrain.viz.surfaces import BRAIN_RGBA, brain_surfaces, foreground_surface, to_mz3

        if is_whole_head(self.bundle.config.get("intensity")):
            surf = foreground_surface(self.volume, "head", note=WHOLE_HEAD_SURFACE)
        else:
            surf = brain_surfaces(self.volume, self.bundle.grid)
        translucent = len(surf.meshes) > 1  # see the ventricles through the brain
        return tuple(Surface(to_mz3(m), name=f"{m.name}.mz3", rgba=m.rgba,
                             opacity=0.4 if translucent and m.rgba == BRAIN_RGBA else 1.0)
                     for m in surf.meshes), surf.note

    @cached_property
    def thumbnail(self) -> bytes:
        from synthbrain.viz.slices import orthogonal_png

        return orthogonal_png(self.volume, width_px=420, annotate=False)

    @property
    def nbytes(self) -> int:
        """Memory the item holds (the volume and its display files)."""
        extra = len(self.__dict__.get("thumbnail", b""))
        extra += sum(len(m) for m in self.__dict__.get("_measured", (None, None, ()))[2])
        if "surface_set" in self.__dict__:
            extra += sum(len(x.data) for x in self.surface_set[0])
        return self.volume.data.nbytes + len(self.display) + extra

    def describe(self, schema) -> str:
        parts = []
        for c in schema:
            v = self.sample.conditions.get(c.name)
            name = c.label.lower()
            parts.append(f"{name} {v:g} {c.unit}".strip() if isinstance(v, float) else f"{name} {v}")
        return ", ".join(parts)

    def short(self, schema) -> str:
        """Values only, units abbreviated: '66 y, F, 27 mL, 1047 mL'."""
        parts = []
        for c in schema:
            v = self.sample.conditions.get(c.name)
            unit = {"years": "y"}.get(c.unit, c.unit)
            parts.append(f"{v:.0f} {unit}".strip() if isinstance(v, float) else str(v))
        return ", ".join(parts)

    def caption(self, schema) -> str:
        """What tells one sample from another: 'Sample 3: 66 y, F, 27 mL, 1047 mL · seed 42 · 4 steps ·
        guidance 2 · fp32 · 1.3 s at 14:03:12'."""
        s = self.sample
        steps = f"{s.steps} step{'s' if s.steps != 1 else ''}"
        when = f" at {self.made_at}" if self.made_at else ""
        return (f"Sample {self.number}: {self.short(schema)} · seed {s.seed} · {steps} · guidance {s.guidance:g} · "
                f"{s.info.get('precision', 'fp32')} · {s.seconds:.1f} s{when}")

    @property
    def entities(self) -> str:
        from synthbrain.sampling import sample_entities

        return sample_entities(self.bundle, f"synth{self.number:04d}").replace(
            "_space-", f"_seed-{self.sample.seed}_space-", 1)

    @property
    def stem(self) -> str:
        """The download's file stem, with the kind (``desc-synthetic``) in it."""
        from synthbrain.export import file_stem

        return file_stem(self.sample.provenance, self.entities)

    def panel(self, title: str, flex: float = 1.0, masks: bool = False) -> Panel:
        """The sample in slices; with ``masks`` the measured brain and ventricles as overlays."""
        return Panel(title, layers=(base_layer(self.display, f"{self.stem}.nii.gz"),
                                    *(self.mask_layers() if masks else ())), flex=flex)

    def surface_panel(self, title: str = "") -> Panel | None:
        surfaces = self.surface_set[0]
        return Panel(title, surfaces=surfaces, view="render") if surfaces else None


def make_item(number: int, sample, bundle) -> GalleryItem:
    """A fresh sample as the page keeps it (its display file made now, ~30 ms on the demo grid)."""
    import time

    return GalleryItem(number=number, sample=sample, bundle=bundle, display=display_bytes(sample.volume, SYNTHETIC),
                       made_at=time.strftime("%H:%M:%S"))


def sample_zip(item: GalleryItem) -> bytes:
    """The sample's NIfTI (float32, [0, 1]) and JSON sidecar in one zip (through the one exporter)."""
    from synthbrain.export import single_file_zip

    return single_file_zip(item.sample.provenance, item.entities, item.volume, item.sidecar)


def sample_png(item: GalleryItem, schema) -> bytes:
    from synthbrain.export import kind
    from synthbrain.viz.slices import orthogonal_png

    return orthogonal_png(item.volume, title=f"Sample {item.number}: {item.describe(schema)} (seed {item.sample.seed})",
                          footer=kind(item.sample.provenance).note)


# --------------------------------------------------------------------------------- reconstruction


@dataclass(frozen=True, eq=False)
class CompareResult:
    """A scan's reconstruction and its display files; ``key`` names the source it came from."""

    key: str
    label: str
    recon: object                  # synthbrain.reconstruction.Reconstruction
    original_display: bytes
    recon_display: bytes
    diff_display: bytes
    details: str = ""

    provenance: str = REAL         # the original: real (a person's scan) or synthetic (a phantom, the template)
    diff_threshold: float = 0.03   # the overlay's default: |difference| below it is not coloured
    diff_top: float = 0.25         # where its colour ramp saturates
    # measure_for_display of the original and of the reconstruction ((None, why not, ()) when not measured)
    measured_original: tuple = (None, None, ())
    measured_recon: tuple = (None, None, ())

    def measurement_rows(self) -> list[dict]:
        """Brain, ventricular and intracranial volume (mL) of the original and of its reconstruction, and
        their difference; [] when they were not measured."""
        a, b = self.measured_original[0], self.measured_recon[0]
        if not a:
            return []

        def ml(d, k):
            return f"{d[k]:.1f}" if d else "n/a"
        return [{"Volume": label, "Original (mL)": ml(a, k), "Reconstruction (mL)": ml(b, k),
                 "Difference (mL)": f"{b[k] - a[k]:+.1f}" if b else "n/a"} for k, label in VOLUME_LABELS.items()]

    @property
    def measure_error(self) -> str | None:
        """Why the original (or else its reconstruction) could not be measured, if so."""
        return self.measured_original[1] or self.measured_recon[1]

    @property
    def recon_provenance(self) -> str:
        """A reconstruction of a person's scan (real, or derived from it) carries their anatomy: derived.
        Of a phantom: synthetic."""
        return SYNTHETIC if self.provenance == SYNTHETIC else DERIVED

    def panels(self, opacity: float, threshold: float, masks: bool = False) -> list[Panel]:
        """The original and the reconstruction + difference, linked; with ``masks`` each with what was
        measured on it (brain, ventricles) as overlays."""
        from synthbrain.viz.display import LARGE_VOXELS

        # a 3D tile ray-casts the whole volume on every redraw of the linked panels: at 1 mm that made the
        # browser take half a minute to draw them (benchmarks/viewer_1mm.py); the toolbar's 3D view remains
        render = self.recon.original.data.size < LARGE_VOXELS
        diff = Layer(self.diff_display, name="difference.nii.gz", label="difference (0..1 scale)",
                     colormap=DIFF_COLORMAPS[0], colormap_negative=DIFF_COLORMAPS[1], opacity=opacity,
                     cal_min=threshold, cal_max=max(self.diff_top, threshold * 1.5), colorbar=DIFF_COLORBAR)
        original = mask_layers(self.measured_original[2]) if masks else ()
        recon = mask_layers(self.measured_recon[2]) if masks else ()
        return [Panel(f"Original: {kind(self.provenance).title}",
                      layers=(base_layer(self.original_display, "original.nii.gz"), *original), show_render=render),
                Panel(f"Reconstruction ({kind(self.recon_provenance).title}) + difference", layers=(
                    base_layer(self.recon_display, "reconstruction.nii.gz"), diff, *recon), show_render=render)]

    def download_stem(self, grid) -> str:
        from synthbrain.export import file_stem
        from synthbrain.grids import SPACE

        return file_stem(self.recon_provenance, f"reconstruction_space-{SPACE}_res-{grid.res_label}_T1w")

    def download_zip(self, bundle) -> bytes:
        """The reconstruction (NIfTI + sidecar): derived from the scan, named by digest only."""
        from synthbrain.export import single_file_zip
        from synthbrain.grids import SPACE

        fields = {"Bundle": bundle.name, "Metrics": self.recon.metrics, "Compression": self.recon.compression,
                  "Grid": bundle.grid.to_dict(),
                  "Kind": f"{'KL autoencoder' if self.recon.indices is None else 'VQ-VAE'} reconstruction"}
        source = self.recon.original if self.recon_provenance == DERIVED else None
        return single_file_zip(self.recon_provenance, f"reconstruction_space-{SPACE}_res-{bundle.grid.res_label}_T1w",
                               self.recon.reconstruction, fields, source)


def make_compare(key: str, label: str, recon, details: str = "", provenance: str = REAL,
                 bundle=None) -> CompareResult:
    """The result as the page keeps it; with ``bundle``, the original and the reconstruction measured
    (brain and ventricles, with their maps for the overlays)."""
    from synthbrain.viz.display import difference_window, display_nifti_bytes

    rec_kind = SYNTHETIC if provenance == SYNTHETIC else DERIVED
    threshold, top = difference_window(recon.difference.data, recon.original.data)
    measured = {} if bundle is None else {"measured_original": measure_for_display(recon.original, bundle),
                                          "measured_recon": measure_for_display(recon.reconstruction, bundle)}
    return CompareResult(key=key, label=label, recon=recon, **measured,
                         original_display=display_bytes(recon.original, provenance),
                         recon_display=display_bytes(recon.reconstruction, rec_kind),
                         diff_display=display_nifti_bytes(recon.difference, "reconstruction - original"),
                         details=details, provenance=provenance, diff_threshold=threshold, diff_top=top)


def metrics_rows(recon, whole_head: bool = False) -> list[dict]:
    """The quality table; ``whole_head``: the scan kept its skull (a whole-head model's convention), so
    the masked PSNR is over the head's non-zero voxels, not the brain's."""
    m = recon.metrics
    rows = [("PSNR", m.get("psnr"), "dB", "whole volume; higher is better"),
            ("PSNR in the head" if whole_head else "PSNR in the brain", m.get("psnr_brain"), "dB",
             "non-zero voxels of the head (skull and scalp included)" if whole_head else "brain voxels only"),
            ("SSIM", m.get("ssim"), "", "structural similarity, 1 = identical"),
            ("MS-SSIM", m.get("ms_ssim"), "", "multi-scale SSIM, 1 = identical"),
            ("MAE", m.get("mae"), "", "mean absolute error, intensities in [0, 1]")]
    return [{"Metric": n, "Value": round(float(v), 4), "Unit": u, "Meaning": d} for n, v, u, d in rows if v is not None]


def compression_rows(recon) -> list[dict]:
    c = recon.compression
    rows = [{"Figure": "Latent grid (channels x X x Y x Z)", "Value": " x ".join(str(n) for n in c["latent_shape"])},
            {"Figure": "Latent values per voxel", "Value": f"{100 * c['latent_values_per_voxel']:.3f} %"}]
    if "latent_bits_per_volume_bits" not in c:  # a KL autoencoder: a continuous latent, no codes
        rows.append({"Figure": "Latent", "Value": "continuous (real numbers, no codebook)"})
        return rows
    rows.append({"Figure": "Code bits / bits of a 16-bit volume",
                 "Value": f"{100 * c['latent_bits_per_volume_bits']:.3f} %"})
    if c.get("latent_bits_per_volume_bits"):
        rows.append({"Figure": "Compression ratio (16-bit volume : codes)",
                     "Value": f"{1 / c['latent_bits_per_volume_bits']:.0f} : 1"})
    return rows
