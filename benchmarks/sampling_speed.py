"""Sampling speed and conditioning adherence: SynthBrain's sampler vs MONAI's
``LatentDiffusionInferer.sample`` with DDIM 50 steps, on the same networks, in the same run.

    python benchmarks/sampling_speed.py [--bundle BUNDLE] [--data BIDS] [--n 16] [--steps 3 5 10] [--threads 2]

Time is "button to volume": conditions in, a (X, Y, Z) volume in [0, 1] out (noise, denoising with
classifier-free guidance, codebook, decoder), per brain, one brain at a time and in a batch of 4.
The baseline runs in fp32 as MONAI's tutorials do; where the generator's precision is not fp32 (bf16
on CPUs with AMX), the baseline is measured again under the same autocast, and the generator again
in fp32, so that the solver's and the precision's shares of the speed-up can be told apart.
Adherence: for the conditions of ``--n`` subjects of ``--data`` (default: requested conditions drawn
from the bundle's population model), Pearson r and MAE between requested and measured volumes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402


def conditions_for(bundle, data: str | None, n: int) -> list[dict]:
    if data:
        from synthbrain.data.bids import BIDSDataset

        ds = BIDSDataset(data, grid=bundle.grid, schema=bundle.schema)
        idx = np.random.default_rng(0).permutation(len(ds))[:n]
        return [ds.subjects[int(i)].values for i in idx]
    rng = np.random.default_rng(0)
    age = bundle.schema["age"]
    return [bundle.population.typical(bundle.schema, {"age": float(rng.uniform(age.low, age.high)),
                                                      "sex": ("F", "M")[k % 2]}) for k in range(n)]


def baseline(bundle, gen, conds: list[dict], seeds: list[int], guidance: float, precision: str = "fp32",
             steps: int = 50) -> np.ndarray:
    """MONAI's LatentDiffusionInferer.sample with DDIM, as its tutorials use it."""
    from monai.inferers import LatentDiffusionInferer
    from monai.networks.schedulers import DDIMScheduler

    from synthbrain.sampling import autocast

    sched = DDIMScheduler(clip_sample=False, **gen.config.scheduler_kwargs())
    sched.set_timesteps(steps)
    prior = bundle.prior
    inferer = LatentDiffusionInferer(sched, scale_factor=gen.scale, ldm_latent_shape=list(prior.padded_shape[1:]),
                                     autoencoder_latent_shape=list(prior.latent_shape[1:]))
    ctx, _ = gen.context(conds)
    with torch.inference_mode(), autocast(gen.device, precision):
        vol = inferer.sample(input_noise=gen.noise(seeds), autoencoder_model=bundle.autoencoder.net,
                             diffusion_model=prior, scheduler=sched, conditioning=ctx, mode="crossattn",
                             verbose=False, cfg=guidance)
    return vol.float().clamp(0, 1)[:, 0].numpy()


def adherence(bundle, volumes: list[np.ndarray], conds: list[dict]) -> dict:
    from synthbrain.io import Volume
    from synthbrain.measure import measure_volume
    from synthbrain.metrics import agreement

    m = [measure_volume(Volume(v, bundle.grid.affine)) for v in volumes]
    names = ("ventricular_volume", "brain_volume")
    return {k: agreement([c[k] for c in conds], [getattr(x, k) for x in m]) for k in names}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="+", default=[3, 5, 10])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto", help="the generator's precision (auto, fp32, bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from synthbrain.bundle import load_bundle
    from synthbrain.sampling import Generator

    bundle = load_bundle(args.bundle)
    gen = Generator(bundle, device="cpu", precision=args.precision)
    fp32 = Generator(bundle, device="cpu", precision="fp32")
    g = gen.config.default_guidance
    conds = conditions_for(bundle, args.data, args.n)
    seeds = list(range(len(conds)))

    def monai_row(precision: str) -> tuple:
        t1 = timed(lambda: baseline(bundle, gen, conds[:1], [0], g, precision), args.repeats)
        t4 = timed(lambda: baseline(bundle, gen, conds[:4], [0, 1, 2, 3], g, precision), 1) / 4
        vols = [baseline(bundle, gen, [c], [s], g, precision)[0] for c, s in zip(conds, seeds)]
        return f"MONAI LatentDiffusionInferer.sample, DDIM 50, {precision}", t1, t4, adherence(bundle, vols, conds)

    def ours_row(generator, k: int) -> tuple:
        t1 = timed(lambda: generator.sample(conds[0], n=1, seed=0, steps=k), args.repeats)
        t4 = timed(lambda: generator.sample(conds[:4], n=4, seed=0, steps=k, batch_size=4), 1) / 4
        vols = [generator.sample(c, n=1, seed=s, steps=k)[0].volume.data for c, s in zip(conds, seeds)]
        return (f"synthbrain Generator, DPM-Solver++ {k}, {generator.precision}", t1, t4,
                adherence(bundle, vols, conds))

    rows = [monai_row("fp32")]
    if gen.precision != "fp32":
        rows.append(monai_row(gen.precision))
    same = rows[-1][1]  # the baseline at the generator's precision
    rows += [ours_row(gen, k) for k in args.steps]
    if gen.precision != "fp32":
        rows.append(ours_row(fp32, gen.config.default_steps))

    t_fp32 = rows[0][1]
    table = ["| sampler | s / brain (1 at a time) | s / brain (batch of 4) | speed-up vs DDIM-50 fp32 | "
             "speed-up vs DDIM-50 same precision | ventricles r / MAE (mL) | brain r / MAE (mL) |",
             "|---|---|---|---|---|---|---|"]
    for name, t1, t4, a in rows:
        v, b = a["ventricular_volume"], a["brain_volume"]
        base_same = same if name.endswith(gen.precision) else t_fp32
        table.append(f"| {name} | {t1:.3f} | {t4:.3f} | {t_fp32 / t1:.1f}x | {base_same / t1:.1f}x | "
                     f"{v['r']:.3f} / {v['mae']:.1f} | {b['r']:.3f} / {b['mae']:.1f} |")
    body = (f"Bundle `{bundle.name}` ({bundle.grid.name} grid, prior trained {bundle.config['prior']['steps_trained']} "
            f"steps, default {gen.config.default_steps} steps), guidance {g}, CPU, {args.threads} threads, "
            f"generator precision {gen.precision}; median of {args.repeats} after a warm-up. Adherence over "
            f"{len(conds)} requested condition sets "
            f"({'from ' + Path(args.data).name if args.data else 'from the population model'}), one seed each, the "
            "same seeds and noise for every sampler.\n\n" + "\n".join(table) + "\n")
    print(body)
    cmd = "python benchmarks/sampling_speed.py" + (f" --data {args.data}" if args.data else "") + \
          f" --n {args.n} --steps {' '.join(map(str, args.steps))} --threads {args.threads}"
    write_section("Sampling speed vs MONAI DDIM-50 (CPU)", cmd, body)


if __name__ == "__main__":
    main()
