"""Privacy: is a synthetic brain a copy of someone the model was trained on?

Generative models of 3D brain MRI memorise training scans (Dar et al. 2024, arXiv 2402.01054), so a
synthetic cohort is only shareable once each sample has been compared with the training set.

**Audit** (:func:`audit`). For every sample, its nearest training subject by two measures:

- *image*: Pearson correlation, inside the template's (dilated) brain mask, of each volume's
  deviation from the training mean (what every brain shares does not count), maximised over
  shifts of up to ``max_shift`` voxels along each axis and turns of ``rotation`` degrees about
  each axis (a copy moved by a voxel or two, or turned a little, is still a copy). All pairs are
  scored at a coarse scale (smoothed, half resolution, 27 shifts) in matrix products; the
  ``shortlist`` best training subjects of each sample are then searched at full resolution, and
  the best match refined by half-voxel moves.
- *embedding*: cosine similarity of the bundle's encoder features (the continuous VQ-VAE latent),
  centred on the training mean, so that what the brains share does not count.

Each measure's threshold is calibrated on data: the similarity of held-out real subjects to their
nearest training subject (the ``quantile`` of those, by default their maximum). A sample above
either threshold is flagged: it is closer to a training subject than any unseen real subject was.

**Membership inference** (:func:`membership_inference`). A loss-threshold attack: a training
subject tends to have a lower denoising loss under the prior than an unseen one. The score is the
prior's loss at a few fixed timesteps and noise draws (and the autoencoder's reconstruction error);
the AUC and the true-positive rate at 1 % false positives say how much membership leaks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from synthbrain.errors import ConfigError, SynthBrainError

OnStep = Callable[[int, int, dict], None]
MIN_CALIBRATION = 3   # held-out subjects below which a threshold would be a guess


@dataclass(frozen=True)
class AuditSettings:
    max_shift: int = 2            # voxels along each axis searched for the image match
    shortlist: int = 8            # training subjects per sample searched over shifts
    quantile: float = 1.0         # of the held-out similarities that sets each threshold (1: their maximum)
    jobs: int = 2                 # threads for the shift search
    smooth: float = 1.0           # Gaussian sigma (voxels) applied before comparing: noise and resampling
                                  # blur do not hide a copy; anatomy, which is smooth, still tells subjects apart
    rotation: float = 2.0         # degrees: the query is also compared turned by +-rotation about each axis

    def __post_init__(self) -> None:
        if not 0 <= self.max_shift <= 5:
            raise ConfigError(f"max_shift must be 0..5 voxels, got {self.max_shift}")
        if self.shortlist < 1:
            raise ConfigError(f"shortlist must be >= 1, got {self.shortlist}")
        if not 0.5 <= self.quantile <= 1.0:
            raise ConfigError(f"quantile must be in [0.5, 1], got {self.quantile}")
        if self.jobs < 1:
            raise ConfigError(f"jobs must be >= 1, got {self.jobs}")
        if not 0.0 <= self.smooth <= 3.0:
            raise ConfigError(f"smooth must be 0..3 voxels, got {self.smooth}")
        if not 0.0 <= self.rotation <= 10.0:
            raise ConfigError(f"rotation must be 0..10 degrees, got {self.rotation}")


@dataclass(frozen=True)
class Match:
    """A volume's nearest training subjects: by image (correlation, at a shift) and by embedding."""

    image_label: str
    correlation: float
    shift: tuple[int, int, int]     # voxels (x, y, z) applied to the training volume
    embedding_label: str
    cosine: float
    turned: str = "none"            # the orientation of the sample that matched best

    def to_dict(self, public: bool = False) -> dict:
        """The match as JSON; ``public`` leaves out which training subjects matched (for a release,
        which must not carry training subjects' identifiers)."""
        d = {"nearest_by_image": self.image_label, "correlation": round(self.correlation, 6),
             "shift_voxels": list(self.shift), "turned": self.turned,
             "nearest_by_embedding": self.embedding_label, "cosine": round(self.cosine, 6)}
        if public:
            del d["nearest_by_image"], d["nearest_by_embedding"]
        return d


def _standardise(v: np.ndarray) -> np.ndarray:
    """Zero mean, unit norm (so that a dot product of two is their Pearson r)."""
    v = v.astype(np.float64) - v.mean()
    n = np.linalg.norm(v)
    return (v / n if n > 0 else v).astype(np.float32)


class ReferenceSet:
    """The training subjects, prepared for nearest-neighbour search.

    Image measure: each training volume's deviation from the training mean ``m``, inside the
    template's dilated brain mask ``M``, standardised. A query ``a`` at shift ``d`` (voxels) is
    compared as ``a[p + d] - m[p]`` for ``p`` in ``M`` against those deviations: an exact copy of a
    training volume moved by ``d`` scores r = 1, while what every brain shares (the mean anatomy)
    does not count. Embedding measure: centred, unit-norm encoder features.

    The candidates searched over shifts are shortlisted at a coarse scale (smoothed, half the
    resolution, shifts of -1..1 coarse voxel), where a moved or slightly turned copy still lines up.
    """

    COARSE_SIGMA = 2.0   # voxels of the full grid

    def __init__(self, labels: Sequence[str], mask: np.ndarray, pad: int, smooth: float = 1.0) -> None:
        self.labels = list(labels)
        self.pad, self.smooth = pad, smooth
        self.shape = tuple(s + 2 * pad for s in mask.shape)
        self.index = np.flatnonzero(np.pad(mask, pad))          # mask voxels, flat, in the padded grid
        # the mask moved by the most negative shift: the voxels at shift d are then a plain slice of the
        # padded volume, from offset(d) - lowest, indexed by these (no index arithmetic per shift)
        self._lowest = self._offset((-pad,) * 3, self.shape, pad)
        self._index_low = self.index + self._lowest
        small = mask[::2, ::2, ::2]
        self.coarse_shape = tuple(s + 2 for s in small.shape)
        self.coarse_index = np.flatnonzero(np.pad(small, 1))

    def _coarse(self, volume: np.ndarray) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        v = gaussian_filter(np.asarray(volume, np.float32), self.COARSE_SIGMA)[::2, ::2, ::2]
        return np.pad(v, 1).reshape(-1)

    def _fit(self, flat: np.ndarray, coarse: np.ndarray, embeddings: np.ndarray) -> ReferenceSet:
        """From the training subjects' masked intensities (N, |M|), their coarse copies and
        embeddings (N, E); the arrays are overwritten by the deviations (one copy in memory)."""
        self.mean = flat.mean(axis=0)
        self.coarse_mean = coarse.mean(axis=0)
        for i in range(len(flat)):
            flat[i] = _standardise(flat[i] - self.mean)
            coarse[i] = _standardise(coarse[i] - self.coarse_mean)
        self.deviations, self.coarse_deviations = flat, coarse                       # (N, |M|), (N, |Mc|)
        self.mean_embedding = embeddings.mean(axis=0)
        self.embeddings = _unit(embeddings - self.mean_embedding)                 # (N, E)
        return self

    def _padded(self, volume: np.ndarray) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        v = np.asarray(volume, np.float32)
        if self.smooth > 0:
            v = gaussian_filter(v, self.smooth)
        return np.pad(v, self.pad).reshape(-1)

    @classmethod
    def build(cls, labels: Sequence[str], get_volume: Callable[[int], np.ndarray], autoencoder, mask: np.ndarray,
              settings: AuditSettings, device: str = "cpu", on_step: OnStep | None = None) -> ReferenceSet:
        """Read, smooth, mask and embed each training volume once (memory: N x |M| floats)."""
        ref = cls(labels, mask, settings.max_shift, settings.smooth)
        flat = np.empty((len(labels), len(ref.index)), np.float32)
        coarse = np.empty((len(labels), len(ref.coarse_index)), np.float32)
        embs = []
        for i in range(len(labels)):
            v = get_volume(i)
            flat[i] = ref._padded(v)[ref.index]
            coarse[i] = ref._coarse(v)[ref.coarse_index]
            embs.append(embed(autoencoder, v, device))
            if on_step:
                on_step(i + 1, len(labels), {"stage": "training set"})
        return ref._fit(flat, coarse, np.stack(embs))

    def _refine(self, volume: np.ndarray, best: tuple) -> tuple:
        return _subvoxel_refine(self, volume, best)

    def scoring_rows(self, subjects: Sequence[int]) -> np.ndarray:
        """The deviations of ``subjects`` with a row of ones below them, for :meth:`_correlations`."""
        return np.vstack([self.deviations[np.asarray(subjects)], np.ones((1, len(self.index)), np.float32)])

    def _correlations(self, padded: np.ndarray, d: Sequence[int], rows: np.ndarray) -> np.ndarray:
        """Pearson r of the query (a :meth:`_padded` volume) at shift ``d`` against each subject of
        ``rows`` (:meth:`scoring_rows`), in one pass over the mask: the deviations have zero mean and
        unit norm, so with ``x = query[M + d] - mean``, ``r = D x / ||x - mean(x)||``, and the row of
        ones gives the sum of ``x`` in the same matrix product."""
        start = self._offset(d, self.shape, self.pad) - self._lowest
        x = np.take(padded[start:], self._index_low)
        x -= self.mean
        p = rows @ x
        n = len(x)
        ss = float(np.dot(x, x)) - float(p[-1]) ** 2 / n
        return p[:-1] / np.float32(np.sqrt(ss)) if ss > 0 else np.zeros(len(p) - 1, np.float32)

    @staticmethod
    def _offset(d: Sequence[int], shape: Sequence[int], pad: int) -> int:
        return int(np.ravel_multi_index(tuple(pad + k for k in d), shape) - np.ravel_multi_index((pad,) * 3, shape))

    def shortlist(self, volume: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` training subjects closest at the coarse scale, best over coarse shifts of -1..1."""
        c = self._coarse(volume)
        best = np.full(len(self.labels), -2.0, np.float32)
        for d in itertools.product((-1, 0, 1), repeat=3):
            q = _standardise(c[self.coarse_index + self._offset(d, self.coarse_shape, 1)] - self.coarse_mean)
            np.maximum(best, self.coarse_deviations @ q, out=best)
        return np.argsort(-best)[:k]

    def query(self, volume: np.ndarray, autoencoder, settings: AuditSettings, device: str = "cpu") -> Match:
        if settings.max_shift > self.pad or settings.smooth != self.smooth:
            raise ConfigError("this reference set was built with other audit settings")
        short = self.shortlist(volume, settings.shortlist)
        rows = self.scoring_rows(short)
        best = (-2.0, int(short[0]), (0, 0, 0), "none")
        k = settings.max_shift
        oriented = {}
        for how, turned in _orientations(np.asarray(volume, np.float32), settings.rotation):
            oriented[how] = turned
            a = self._padded(turned)
            for d in itertools.product(range(-k, k + 1), repeat=3):
                r = self._correlations(a, d, rows)
                j = int(np.argmax(r))
                if r[j] > best[0]:
                    best = (float(r[j]), int(short[j]), d, how)
        best = self._refine(oriented[best[3]], best)
        e = _unit(embed(autoencoder, volume, device) - self.mean_embedding)
        cos = self.embeddings @ e
        j = int(np.argmax(cos))
        return Match(self.labels[best[1]], best[0], tuple(int(x) for x in best[2]), self.labels[j], float(cos[j]),
                     best[3])


def _subvoxel_refine(ref: ReferenceSet, volume: np.ndarray, best: tuple) -> tuple:
    """The best match, refined by half-voxel moves (-0.5, 0, +0.5 along each axis, linear
    interpolation) around its integer shift: a copy moved by a fraction of a voxel lines up too."""
    from scipy.ndimage import shift as move

    r_best, i, d, how = best
    rows = ref.scoring_rows([i])
    for f in itertools.product((-0.5, 0.0, 0.5), repeat=3):
        if f == (0.0, 0.0, 0.0):
            continue
        r = float(ref._correlations(ref._padded(move(volume, f, order=1, mode="constant")), d, rows)[0])
        if r > r_best:
            r_best = r
    return r_best, i, d, how


def _orientations(volume: np.ndarray, degrees: float):
    """(name, volume): the volume, then turned by -degrees and +degrees in each voxel-axis plane
    (about z, y and x; linear interpolation)."""
    from scipy.ndimage import rotate

    yield "none", volume
    if degrees <= 0:
        return
    for axes, about in (((0, 1), "z"), ((0, 2), "y"), ((1, 2), "x")):
        for sign in (-1.0, 1.0):
            yield (f"{sign * degrees:+g} deg about {about}",
                   rotate(volume, sign * degrees, axes=axes, reshape=False, order=1, mode="constant"))


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(n > 0, n, 1.0)).astype(np.float32)


@torch.inference_mode()
def embed(autoencoder, volume: np.ndarray, device: str = "cpu") -> np.ndarray:
    """The encoder's continuous latent of a volume (X, Y, Z) on the bundle's grid, flattened."""
    x = torch.from_numpy(np.asarray(volume, np.float32)[None, None]).to(device)
    return autoencoder.encode(x).float().reshape(-1).cpu().numpy()


@dataclass
class AuditReport:
    """What :func:`audit` found; ``to_dict`` is the JSON report."""

    samples: list[dict]                 # id, match, flagged, reasons
    holdout: list[dict]                 # label, match (the calibration set)
    thresholds: dict[str, float]
    settings: AuditSettings
    train_subjects: int
    seconds: dict[str, float] = field(default_factory=dict)
    bundle: str = ""

    @property
    def flagged(self) -> list[dict]:
        return [s for s in self.samples if s["flagged"]]

    def to_dict(self) -> dict:
        n = len(self.samples)
        return {"bundle": self.bundle, "train_subjects": self.train_subjects, "samples": n,
                "flagged": len(self.flagged), "share_flagged": len(self.flagged) / n if n else float("nan"),
                "thresholds": self.thresholds, "settings": asdict(self.settings),
                "calibration": {"holdout_subjects": len(self.holdout),
                                "rule": f"the {self.settings.quantile:g} quantile of held-out subjects' similarity "
                                        "to their nearest training subject, per measure; a sample above either "
                                        "threshold is flagged"},
                "seconds": self.seconds, "per_sample": self.samples, "holdout": self.holdout}


def thresholds_from(matches: Sequence[Match], quantile: float) -> dict[str, float]:
    if len(matches) < MIN_CALIBRATION:
        raise ConfigError(f"calibration needs at least {MIN_CALIBRATION} held-out subjects, got {len(matches)}; "
                          "pass more with --holdout")
    return {"correlation": float(np.quantile([m.correlation for m in matches], quantile)),
            "cosine": float(np.quantile([m.cosine for m in matches], quantile))}


class Auditor:
    """A training set prepared for search (:class:`ReferenceSet`) and thresholds calibrated on held-out
    subjects: built once, then :meth:`audit` any number of samples (the app and a release do)."""

    def __init__(self, bundle, train, holdout, settings: AuditSettings = AuditSettings(), device: str = "cpu",
                 on_step: OnStep | None = None) -> None:
        from synthbrain.data.template import load_template

        if len(holdout) < MIN_CALIBRATION:
            raise ConfigError(f"the audit needs at least {MIN_CALIBRATION} held-out subjects to calibrate its "
                              f"thresholds, got {len(holdout)}; pass more with --holdout")
        self.bundle, self.settings, self.device = bundle, settings, device
        self.ae = bundle.autoencoder.to(device).eval()
        t0 = time.perf_counter()
        mask = load_template(bundle.grid).search_mask
        n_steps = len(train) + len(holdout)

        def build_step(i: int, n: int, info: dict) -> None:
            if on_step:
                on_step(i, n_steps, info)

        self.reference = ReferenceSet.build(train.labels, train.volume, self.ae, mask, settings, device, build_step)
        self.seconds = {"reference_set": time.perf_counter() - t0}
        t1 = time.perf_counter()
        self.holdout_labels = list(holdout.labels)
        self.holdout = self._run([holdout.volume(i) for i in range(len(holdout))], "held-out subjects",
                                 on_step and (lambda i, n, info: on_step(len(train) + i, n_steps, info)))
        self.seconds["calibration"] = time.perf_counter() - t1
        self.thresholds = thresholds_from(self.holdout, settings.quantile)

    def _run(self, volumes: Sequence[np.ndarray], stage: str, on_step: OnStep | None = None) -> list[Match]:
        def one(v: np.ndarray) -> Match:
            return self.reference.query(v, self.ae, self.settings, self.device)

        out = []
        with ThreadPoolExecutor(max_workers=self.settings.jobs) as pool:
            for m in pool.map(one, volumes):
                out.append(m)
                if on_step:
                    on_step(len(out), len(volumes), {"stage": stage})
        return out

    def is_flagged(self, m: Match) -> list[str]:
        """The measures on which ``m`` is closer to a training subject than any held-out subject was."""
        above = {"image": m.correlation > self.thresholds["correlation"],
                 "embedding": m.cosine > self.thresholds["cosine"]}
        return [k for k, v in above.items() if v]

    def audit(self, samples: Sequence[tuple[str, np.ndarray]], on_step: OnStep | None = None) -> AuditReport:
        """Audit ``samples``: (id, volume (X, Y, Z) on the bundle's grid) pairs."""
        t0 = time.perf_counter()
        found = self._run([v for _, v in samples], "samples", on_step)
        t_query = time.perf_counter() - t0
        rows = []
        for (sid, _), m in zip(samples, found):
            reasons = self.is_flagged(m)
            rows.append({"id": sid, **m.to_dict(), "flagged": bool(reasons), "reasons": reasons})
        n_train = len(self.reference.labels)
        pairs = (len(samples) + len(self.holdout)) * n_train
        search = t_query + self.seconds["calibration"]
        return AuditReport(samples=rows, holdout=[{"label": lab, **m.to_dict()}
                                                  for lab, m in zip(self.holdout_labels, self.holdout)],
                           thresholds=self.thresholds, settings=self.settings, train_subjects=n_train,
                           bundle=self.bundle.name,
                           seconds={**self.seconds, "search": t_query,
                                    "per_sample_x_training_subject": search / pairs if pairs else float("nan")})


def audit(samples: Sequence[tuple[str, np.ndarray]], train, holdout, bundle, settings: AuditSettings = AuditSettings(),
          device: str = "cpu", on_step: OnStep | None = None) -> AuditReport:
    """Audit ``samples`` ((id, volume (X, Y, Z) on the bundle's grid) pairs) against the training
    dataset ``train``, calibrated on ``holdout`` (BIDS datasets on the bundle's grid)."""
    total = len(train) + len(holdout) + len(samples)
    auditor = Auditor(bundle, train, holdout, settings, device, on_step)
    offset = len(train) + len(holdout)
    return auditor.audit(samples, on_step and (lambda i, n, info: on_step(offset + i, total, info)))


# ------------------------------------------------------------------------------------- the report


def write_report(report: AuditReport, out_dir, get_sample: Callable[[str], np.ndarray],
                 get_train: Callable[[str], np.ndarray], grid, max_pictures: int = 12) -> dict:
    """``report.json``, ``report.html`` (histograms: samples vs held-out subjects against the
    training set; the flagged samples, or the closest ones, beside their nearest training subject)
    and the pair pictures ``pairs/<id>.png``. Returns the JSON written."""
    import json
    from pathlib import Path

    from synthbrain.io import Volume, atomic_write
    from synthbrain.viz.slices import rows_png

    out = Path(out_dir)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    d = report.to_dict()
    ranked = sorted(report.samples, key=lambda r: (not r["flagged"], -r["correlation"]))[:max_pictures]
    pictures = []
    for r in ranked:
        png = rows_png([(f"sample {r['id']} (synthetic)", Volume(get_sample(r["id"]), grid.affine)),
                        (f"nearest training subject {r['nearest_by_image']}",
                         Volume(get_train(r["nearest_by_image"]), grid.affine))],
                       title=f"{r['id']}: r = {r['correlation']:.4f} at shift {tuple(r['shift_voxels'])} "
                             f"(threshold {report.thresholds['correlation']:.4f}); "
                             f"{'FLAGGED' if r['flagged'] else 'not flagged'}",
                       width_px=900)
        name = f"pairs/{_safe(r['id'])}.png"
        atomic_write(out / name, png)
        pictures.append((r, name, png))
    d["pictures"] = [name for _, name, _ in pictures]
    atomic_write(out / "report.json", json.dumps(d, indent=2) + "\n")
    atomic_write(out / "report.html", _html(d, pictures))
    return d


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def histogram_figure(d: dict, measure: str):
    """Plotly histogram: each sample's and each held-out subject's similarity to its nearest
    training subject, with the threshold."""
    import plotly.graph_objects as go

    key = {"correlation": "correlation", "cosine": "cosine"}[measure]
    fig = go.Figure()
    fig.add_histogram(x=[r[key] for r in d["holdout"]], name="held-out real subjects -> training", opacity=0.6)
    fig.add_histogram(x=[r[key] for r in d["per_sample"]], name="synthetic samples -> training", opacity=0.6)
    fig.add_vline(x=d["thresholds"][measure], line_dash="dash", annotation_text="threshold")
    title = {"correlation": "Image: best Pearson r inside the brain mask (shifts up to "
                            f"{d['settings']['max_shift']} voxels, turns of {d['settings'].get('rotation', 0):g}°)",
             "cosine": "Embedding: cosine similarity of centred encoder features"}[measure]
    fig.update_layout(barmode="overlay", title=title, xaxis_title=f"{measure} with the nearest training subject",
                      yaxis_title="count", height=360, margin=dict(l=40, r=20, t=50, b=40))
    return fig


def _html(d: dict, pictures: Sequence[tuple[dict, str, bytes]]) -> str:
    """One self-contained page: plotly inlined, pictures embedded (it opens offline)."""
    import base64
    import html

    import plotly.io as pio

    # fixed div ids: the same report gives the same page, byte for byte
    figs = "".join(pio.to_html(histogram_figure(d, m), full_html=False, div_id=f"histogram-{m}",
                               include_plotlyjs="inline" if i == 0 else False)
                   for i, m in enumerate(("correlation", "cosine")))
    rows = "".join(
        f"<tr><td>{html.escape(r['id'])}</td><td>{r['correlation']:.4f}</td>"
        f"<td>{html.escape(r.get('nearest_by_image', '(not named in a release)'))}</td><td>{r['cosine']:.4f}</td>"
        f"<td>{html.escape(r.get('nearest_by_embedding', '(not named in a release)'))}</td>"
        f"<td>{'<b>flagged</b> (' + ', '.join(r['reasons']) + ')' if r['flagged'] else 'no'}</td></tr>"
        for r in d["per_sample"])
    imgs = "".join(f"<figure><img src='data:image/png;base64,{base64.b64encode(png).decode()}' width='900'>"
                   f"<figcaption>{html.escape(r['id'])}</figcaption></figure>" for r, _, png in pictures)
    t = d["thresholds"]
    per_pair = d["seconds"].get("per_sample_x_training_subject")
    cost = (f" Search cost {1000 * per_pair:.2f} ms per sample x training subject." if per_pair is not None else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>SynthBrain memorisation audit</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}td,th{{padding:2px 8px}}</style></head><body>
<h1>Memorisation audit: {html.escape(d['bundle'])}</h1>
<p>{d['samples']} synthetic samples against {d['train_subjects']} training subjects; <b>{d['flagged']} flagged
({100 * d['share_flagged']:.1f} %)</b>. Thresholds (calibrated on {d['calibration']['holdout_subjects']} held-out
subjects: {html.escape(d['calibration']['rule'])}): image r {t['correlation']:.4f}, embedding cosine
{t['cosine']:.4f}.{cost}</p>{figs}
<h2>Samples</h2><table><tr><th>sample</th><th>image r</th><th>nearest (image)</th><th>cosine</th>
<th>nearest (embedding)</th><th>flagged</th></tr>{rows}</table>
<h2>{'Flagged samples' if d['flagged'] else 'The closest samples'} beside their nearest training subject</h2>{imgs}
</body></html>
"""


# ------------------------------------------------------------------------------- data for an audit


def read_samples(folder, grid) -> list[tuple[str, np.ndarray]]:
    """The synthetic volumes of a SynthBrain dataset folder as (subject-and-file id, volume) pairs.
    Anything whose sidecar does not declare it synthetic (a derived edit or reconstruction, a real
    scan, a file without a sidecar) is refused: only synthetic data may be audited for release."""
    from pathlib import Path

    from synthbrain.errors import InvalidVolumeError
    from synthbrain.export import SYNTHETIC, read_provenance
    from synthbrain.io import read_volume

    root = Path(folder)
    files = sorted(p for p in root.rglob("*_T1w.nii*") if "derivatives" not in p.relative_to(root).parts)
    if not files:
        raise ConfigError(f"{root}: no *_T1w.nii.gz files found")
    out = []
    for f in files:
        kind = read_provenance(f)
        if kind != SYNTHETIC:
            raise ConfigError(f"{f.name}: its sidecar says {kind or 'nothing about its provenance'}; only synthetic "
                              "volumes (SynthBrain samples) can be audited or released")
        v = read_volume(f)
        if v.shape != tuple(grid.shape) or not np.allclose(v.affine, grid.affine, atol=1e-4):
            raise InvalidVolumeError(f"{f.name}: not on the bundle's {grid.name} grid")
        out.append((f.name.split("_")[0] + "/" + f.name, v.data))
    return out


def holdout_split(bundle, train_root, holdout_root=None, fraction: float = 0.1, with_conditions: bool = False):
    """(training set, calibration set) as BIDS datasets on the bundle's grid: ``holdout_root`` when
    given; else the prior's held-out subjects recorded in the bundle, when ``train_root`` holds them;
    else a seeded ``fraction`` of ``train_root``. The audit needs images only; ``with_conditions``
    also reads (and validates) the bundle's conditions from participants.tsv."""
    from synthbrain.conditions import ConditionSchema
    from synthbrain.data.bids import BIDSDataset, split_subjects

    schema = bundle.schema if with_conditions else ConditionSchema(())
    full = BIDSDataset(train_root, grid=bundle.grid, schema=schema)
    if holdout_root is not None:
        return full, BIDSDataset(holdout_root, grid=bundle.grid, schema=schema)
    # the prior's held-out subjects, when this is the data it was trained on
    recorded = ([s for s in bundle.config.get("prior", {}).get("val_subjects", []) if s in set(full.labels)]
                if bundle.trained_on("prior", full) else [])
    if recorded:
        held = recorded
    else:
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"holdout fraction must be in (0, 1), got {fraction}")
        _, held = split_subjects(full.labels, fraction, seed=0, min_val=MIN_CALIBRATION)
    if not held or len(held) == len(full):
        raise ConfigError(f"{train_root}: cannot split off held-out subjects for calibration; pass --holdout")
    train = [s for s in full.labels if s not in set(held)]
    return (BIDSDataset(train_root, grid=bundle.grid, schema=schema, subjects=train),
            BIDSDataset(train_root, grid=bundle.grid, schema=schema, subjects=held))


# ---------------------------------------------------------------------------- membership inference


@torch.inference_mode()
def membership_scores(bundle, dataset, timesteps: Sequence[int] = (50, 200, 500), draws: int = 2,
                      device: str = "cpu", on_step: OnStep | None = None) -> dict[str, np.ndarray]:
    """Per subject of ``dataset``: the prior's mean denoising loss (MSE of its prediction target) at
    ``timesteps`` over ``draws`` fixed noise draws, with the subject's own conditions, and the
    autoencoder's reconstruction error (MSE). Lower means 'more like a training subject'."""
    from monai.networks.schedulers import DDPMScheduler

    prior, ae = bundle.prior.to(device).eval(), bundle.autoencoder.to(device).eval()
    sched = DDPMScheduler(**prior.config.scheduler_kwargs())
    kind = prior.config.prediction_type
    losses, recon = [], []
    t = torch.tensor(list(timesteps) * draws, device=device)
    for i in range(len(dataset)):
        x = torch.from_numpy(dataset.volume(i)[None, None].copy()).to(device)
        q = ae.encode_quantized(x)
        recon.append(float(((ae.decode(q).float().clamp(0, 1) - x) ** 2).mean()))
        x0 = prior.pad(q * bundle.scale_factor).expand(len(t), -1, -1, -1, -1)
        g = torch.Generator().manual_seed(1234)  # the same noise for every subject: only the subject differs
        noise = torch.randn(x0.shape, generator=g).to(device)
        ctx = torch.from_numpy(dataset.conditions(i)).to(device)[None, None].expand(len(t), -1, -1)
        pred = prior(sched.add_noise(x0, noise, t), t, ctx).float()
        target = {"epsilon": noise, "sample": x0}.get(kind)
        if target is None:
            target = sched.get_velocity(x0, noise, t)
        losses.append(float(((pred - target) ** 2).mean()))
        if on_step:
            on_step(i + 1, len(dataset), {"stage": "membership"})
    return {"prior_loss": np.array(losses), "reconstruction_error": np.array(recon)}


def attack_metrics(members: np.ndarray, non_members: np.ndarray) -> dict[str, float]:
    """AUC of 'lower score = member', and the true-positive rate at 1 % false positives."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    s = -np.r_[members, non_members]
    fpr, tpr, _ = roc_curve(y, s)
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": float(np.max(tpr[fpr <= 0.01], initial=0.0)),
            "members": int(len(members)), "non_members": int(len(non_members))}


def membership_inference(bundle, members, non_members, device: str = "cpu", on_step: OnStep | None = None,
                         **kw) -> dict:
    """The loss-threshold attack on ``members`` (training subjects) vs ``non_members`` (held out)."""
    a = membership_scores(bundle, members, device=device, on_step=on_step, **kw)
    b = membership_scores(bundle, non_members, device=device, on_step=on_step, **kw)
    return {name: attack_metrics(a[name], b[name]) for name in a} | {
        "note": "loss-threshold attack (Yeom et al. 2018): a subject with a lower loss is called a member; "
                "AUC 0.5 = no leak"}


# ------------------------------------------------------------------------------------------ release

RELEASE_MARK = ".synthbrain-release.json"   # the plan of a release; its folder is ours to resume
RELEASE_STATE = ".release"                  # one record per finished subject, written last
MAX_ATTEMPTS = 5                            # fresh seeds tried for a slot whose sample was flagged


def release_conditions(bundle, how: str, n: int, train, seed: int) -> list[dict]:
    """The requested conditions of a release's ``n`` subjects: ``grid`` (ages evenly over the range
    for each sex, volumes typical for age and sex), ``population`` (drawn from the training subjects'
    conditions) or a TSV file (one row per subject; columns named as the conditions)."""
    from pathlib import Path

    from synthbrain.data.bids import read_tsv

    schema, pop = bundle.schema, bundle.population
    if how == "grid":
        sexes = schema["sex"].categories if "sex" in schema.names else [None]
        age = schema["age"] if "age" in schema.names else None
        per = -(-n // len(sexes))
        out = []
        for k in range(per):
            for s in sexes:
                given = {} if s is None else {"sex": s}
                if age is not None:
                    given["age"] = round(age.low + (age.high - age.low) * (k + 0.5) / per, 1)
                out.append(schema.complete(pop.typical(schema, given)))
        return out[:n]
    if how == "population":
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(train), n)
        return [schema.complete(dict(train.subjects[int(i)].values)) for i in picks]
    path = Path(how)
    if not path.is_file():
        raise ConfigError(f"--conditions must be grid, population or a TSV file; {how!r} is none of these")
    out = []
    for k, row in enumerate(read_tsv(path)):
        given = {c: v for c, v in row.items() if c in schema.names and v not in ("", "n/a")}
        try:
            out.append(schema.complete(pop.typical(schema, schema.complete(given) | {
                c: None for c in schema.names if c not in given})))
        except SynthBrainError as e:
            raise ConfigError(f"{path}: row {k + 1}: {e}") from None
    if len(out) != n:
        raise ConfigError(f"{path}: {len(out)} rows of conditions for --n {n}; give one row per subject")
    return out


def release(bundle, n: int, conditions: str, train_root, out, holdout_root=None, seed: int = 0,
            steps: int | None = None, guidance: float | None = None, settings: AuditSettings = AuditSettings(),
            device: str = "cpu", precision: str = "auto", on_step: OnStep | None = None, dist=None) -> dict:
    """Sample ``n`` synthetic brains, audit each against the training set, replace the flagged ones
    (a fresh seed, up to ``MAX_ATTEMPTS`` per subject; a subject still flagged then is dropped, and
    said so) and write a shareable BIDS derivative dataset to ``out``.

    Resumable: every finished subject's record is written last (atomically), so a release killed at
    any moment and restarted with the same arguments skips what is done and ends with the dataset an
    uninterrupted run writes. ``out`` must be new, empty, or a release with the same plan.

    ``dist`` (the :class:`~synthbrain.training.distributed.DistContext` of a torchrun job; default: one
    process) shards the subjects: rank r samples and audits subjects r, r + K, ... (one at a time, as
    one process does) and writes them and their records into ``out`` (a folder every rank sees); once
    every rank is done, rank 0 alone writes participants.tsv, the report and dataset_description.json
    from the records. Every rank returns rank 0's summary.
    """
    import hashlib
    import json
    from pathlib import Path

    from synthbrain.export import SYNTHETIC, DatasetWriter, generated_by
    from synthbrain.io import atomic_write
    from synthbrain.sampling import Generator, measure_sample, sample_entities, sample_sidecar
    from synthbrain.training.distributed import DistContext

    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    out = Path(out)
    train, held = holdout_split(bundle, train_root, holdout_root, with_conditions=conditions == "population")
    plan = {"bundle": bundle.name, "weights": {c: bundle.config.get(c, {}).get("sha256") for c in ("autoencoder",
                                                                                                  "prior")},
            "n": n, "conditions": conditions, "seed": seed, "steps": steps, "guidance": guidance,
            # digests, not the lists: a release carries no training subject's identifier
            "train": _digest(train.labels), "holdout": _digest(held.labels), "train_subjects": len(train),
            "holdout_subjects": len(held), "settings": asdict(settings),
            "precision": precision}
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    dist = dist or DistContext()
    dev = torch.device(device)

    def sync(obj=None) -> list:  # a collective: every rank waits for all (tensors on the GPU under nccl)
        return dist.all_gather_json(obj, dev if dev.type == "cuda" else torch.device("cpu"))

    sync()  # every rank is past its command line (whose --out probe is an entry in the folder)
    mark = out / RELEASE_MARK
    if out.exists() and any(out.iterdir()):
        if not mark.is_file():
            raise ConfigError(f"{out} is not empty and is not a SynthBrain release; choose a new folder")
        if json.loads(mark.read_text()).get("plan_id") != plan_id:
            raise ConfigError(f"{out} holds a release with other settings; resume it with the same arguments "
                              "or choose a new folder")
    sync()  # every rank has looked at the folder before rank 0 marks it
    state = out / RELEASE_STATE
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(mark, json.dumps({"plan_id": plan_id, "plan": plan}, indent=2) + "\n")
        state.mkdir(exist_ok=True)
    sync()

    wanted = release_conditions(bundle, conditions, n, train, seed)
    gen = Generator(bundle, device=device, precision=precision)
    auditor = Auditor(bundle, train, held, settings, device)
    thr = auditor.thresholds
    writer = DatasetWriter(SYNTHETIC, "SynthBrain synthetic cohort (audited release)", generated_by(bundle),
                           folder=out)
    for i, cond in enumerate(wanted):
        if i % dist.world_size != dist.rank:
            continue
        sub = f"synth{i + 1:04d}"
        record = state / f"sub-{sub}.json"
        if not record.is_file():
            attempts = []
            for k in range(MAX_ATTEMPTS):
                s = gen.sample(cond, n=1, seed=seed + i + k * n, steps=steps, guidance=guidance)[0]
                m = auditor.reference.query(s.volume.data, auditor.ae, settings, device)
                flagged = bool(auditor.is_flagged(m))
                attempts.append({"seed": s.seed, **m.to_dict(public=True), "flagged": flagged})
                if not flagged:
                    break
            rec = {"subject": f"sub-{sub}", "conditions": cond, "attempts": attempts, "kept": not flagged}
            if not flagged:
                vols, entry = measure_sample(s)
                writer.add(f"sub-{sub}/anat", sample_entities(bundle, sub), s.volume,
                           sample_sidecar(s, bundle, {"Measured": entry, "Audit": m.to_dict(public=True) | {
                               "thresholds": thr, "flagged": False}}))
                rec.update(seed=s.seed, steps=s.steps, guidance=s.guidance, measured=vols,
                           match=m.to_dict(public=True))
            atomic_write(record, json.dumps(rec, indent=2, default=float) + "\n")  # last: the subject is done
        if on_step:
            on_step(i + 1, n, {"stage": "sample + audit"})
    sync()  # every subject's record is on disk
    return sync(_finish_release(out, bundle, n, auditor, writer, plan) if dist.is_main else None)[0]


def _finish_release(out, bundle, n, auditor: Auditor, writer, plan) -> dict:
    """participants.tsv, the audit report, the README and dataset_description.json, from the records."""
    import json
    from types import SimpleNamespace

    from synthbrain.io import atomic_write
    from synthbrain.sampling import samples_table

    thr = auditor.thresholds
    records = [json.loads((out / RELEASE_STATE / f"sub-synth{i + 1:04d}.json").read_text()) for i in range(n)]
    kept = [r for r in records if r["kept"]]
    replaced = sum(len(r["attempts"]) - 1 for r in kept)
    dropped = [r["subject"] for r in records if not r["kept"]]
    fake = [SimpleNamespace(conditions=r["conditions"], seed=r["seed"]) for r in kept]
    rows, cols, units = samples_table(fake, [r["subject"] for r in kept], bundle, [r["measured"] for r in kept])
    for row, r in zip(rows, kept):
        row.update(nearest_training_correlation=r["match"]["correlation"],
                   nearest_training_cosine=r["match"]["cosine"], audit_attempts=len(r["attempts"]))
    cols += ["nearest_training_correlation", "nearest_training_cosine", "audit_attempts"]
    units.update(nearest_training_correlation={
        "Description": "image similarity (Pearson r of deviations from the training mean, best shift) with the "
                       f"nearest training subject; flagged above {thr['correlation']:.4f}"},
        nearest_training_cosine={"Description": "encoder-embedding cosine with the nearest training subject; "
                                                f"flagged above {thr['cosine']:.4f}"},
        audit_attempts={"Description": "samples drawn for this subject (1 = the first passed the audit)"})
    writer.table("participants.tsv", rows, cols, units)
    report = AuditReport(samples=[{"id": r["subject"], **r["match"], "flagged": False, "reasons": []} for r in kept],
                         holdout=[{"label": f"held-out-{k + 1}", **m.to_dict(public=True)}
                                  for k, m in enumerate(auditor.holdout)],
                         thresholds=thr, settings=auditor.settings, train_subjects=plan["train_subjects"],
                         bundle=bundle.name)
    summary = {"requested": n, "released": len(kept), "replaced_flagged_samples": replaced, "dropped": dropped,
               "thresholds": thr}
    d = report.to_dict() | {"release": summary}
    (out / "audit").mkdir(exist_ok=True)
    atomic_write(out / "audit" / "report.json", json.dumps(d, indent=2) + "\n")
    atomic_write(out / "audit" / "report.html", _html(d, []))
    writer.text("README.md", _release_readme(bundle, summary, plan))
    writer.close()
    return summary


def _digest(labels: Sequence[str]) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256("\n".join(sorted(labels)).encode()).hexdigest()[:16]


def _release_readme(bundle, summary: dict, plan: dict) -> str:
    from synthbrain import __version__

    thr = summary["thresholds"]
    return f"""# SynthBrain synthetic cohort

**What this is.** {summary['released']} synthetic T1-weighted brain MRI volumes sampled from the generative
model `{bundle.name}` (synthbrain {__version__}), with the requested conditions, seeds and the
volumes measured on each sample in `participants.tsv`. Every volume is *synthetic*: sampled from noise,
not a scan of any person. NIfTI headers are fresh (no names, dates or header text from anywhere).

**How it was checked.** Each sample was compared with all {plan['train_subjects']} training subjects of the model:
by image (Pearson r of its deviation from the training mean inside the brain mask, best over shifts of up to
{plan['settings']['max_shift']} voxels) and by the model's encoder embedding (cosine). A sample closer to a
training subject than any of {plan['holdout_subjects']} held-out real subjects was (r > {thr['correlation']:.4f}
or cosine > {thr['cosine']:.4f}) was flagged and replaced by a fresh sample: {summary['replaced_flagged_samples']}
replaced, {len(summary['dropped'])} dropped after {MAX_ATTEMPTS} attempts. The report is in `audit/`.

**What this is not.** Not a dataset of people, not for diagnosis. The audit catches copies and near-copies
of training scans; it does not prove that nothing about a training subject can be inferred (see the model
card's membership-inference figures). The model's limits (its training data, its grid) are those of its card.
"""
