"""Time and peak memory per brain of the UK Biobank brain LDM (MONAI model zoo), MONAI's reference
sampler vs SynthBrain's, on the same weights in one run.

    python benchmarks/ukb_ldm.py [--grid full|demo] [--steps 10] [--reference-steps 50] [--device cpu]
                                 [--threads 2] [--write]

The real bundle is not needed (nor downloaded): the networks are the bundle's exact architectures
(AutoencoderKL 13.8 M, DiffusionModelUNet 553 M parameters, the arguments of its inference.json)
with seeded random weights, saved in the model-zoo layout and imported with ``synthbrain
import-bundle``'s function, so both samplers read the same weights. Speed and memory do not depend on
what the weights are. ``--grid demo`` runs the same networks on a latent of 10 x 14 x 10 (an 80 x 112
x 80 volume), an eighth of the work, where the full grid takes too long for a quick check.

Each sampler runs in a fresh process (peak RSS is the process's ru_maxrss, weights included):
- reference: MONAI DDIMScheduler (the bundle's schedule), ``--reference-steps`` steps of the bundle's
  sampler loop (conditions concatenated and as context), then ``decode_stage_2_outputs`` (whole).
- synthbrain: ``Generator`` on the imported bundle: DPM-Solver++ 2M, ``--steps`` steps, one pass a
  step (no guidance), the decode sliced in bounded memory (``--decode``; auto slices on a CPU at 1 mm).
- equality: one latent decoded whole and sliced; the largest absolute difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from synthbrain.testing import UKB_LDM_INFERENCE

sys.path.insert(0, str(Path(__file__).resolve().parent))

INFERENCE = {**UKB_LDM_INFERENCE, "load_old": 0}  # the bundle's networks, schedule and sampler inputs
LATENTS = {"full": (20, 28, 20), "demo": (10, 14, 10)}
CONDITIONS = [0.0, 0.1, 0.2, 0.4]  # the bundle's defaults: gender, age, ventricular_vol, brain_vol


def _args(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def make_zoo(root: Path, grid: str) -> Path:
    """The bundle's layout with seeded random weights of its exact networks."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    inf = copy.deepcopy(INFERENCE)
    inf["noise"] = f"$torch.randn((1, 3, {', '.join(map(str, LATENTS[grid]))})).to(@device)"
    for d in ("configs", "models"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(inf, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "benchmark (random weights)"}))
    torch.manual_seed(0)
    torch.save(AutoencoderKL(**_args(inf["autoencoder_def"])).state_dict(), root / "models" / "autoencoder.pt")
    torch.save(DiffusionModelUNet(**_args(inf["diffusion_def"])).state_dict(), root / "models" / "model.pt")
    return root


def _reset_peak() -> float:
    """Reset the process's peak RSS (Linux: VmHWM, via clear_refs) so the decode's own peak can be read;
    returns the RSS now (GB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_gb("VmRSS")


def _status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024**2
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak(before_decode: float) -> dict:
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
           "rss_before_decode_gb": before_decode, "decode_peak_rss_gb": _status_gb("VmHWM")}
    if torch.cuda.is_available():
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_reference(zoo: Path, grid: str, steps: int, device: torch.device) -> dict:
    """MONAI's networks and DDIM with the bundle's arguments, the bundle sampler's loop, a whole decode."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from monai.networks.schedulers import DDIMScheduler

    inf = INFERENCE
    ae = AutoencoderKL(**_args(inf["autoencoder_def"]))
    unet = DiffusionModelUNet(**_args(inf["diffusion_def"]))
    ae.load_state_dict(torch.load(zoo / "models" / "autoencoder.pt", weights_only=True))
    unet.load_state_dict(torch.load(zoo / "models" / "model.pt", weights_only=True))
    ae, unet = ae.to(device).eval(), unet.to(device).eval()
    sched = DDIMScheduler(**_args(inf["scheduler"]))
    sched.set_timesteps(num_inference_steps=steps)
    cond = torch.tensor([[CONDITIONS]], device=device)                        # (1, 1, 4)
    # the UNet halves twice: a latent not divisible by 4 (the demo grid's) is denoised padded and cropped back,
    # as MONAI's LatentDiffusionInferer does with ldm_latent_shape (the full grid's 20 x 28 x 20 needs none)
    padded = tuple(-(-s // 4) * 4 for s in LATENTS[grid])
    x = torch.randn((1, 3, *padded), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        concat = cond[:, 0, :, None, None, None].expand(-1, -1, *x.shape[2:])
        for t in sched.timesteps:
            eps = unet(torch.cat([x, concat], 1), timesteps=torch.tensor([int(t)], device=device), context=cond)
            x, _ = sched.step(eps, t, x)
        _sync(device)
        t1 = time.perf_counter()
        before = _reset_peak()
        if padded != LATENTS[grid]:
            from monai.transforms import CenterSpatialCrop

            x = CenterSpatialCrop(LATENTS[grid])(x[0]).as_tensor()[None]
        vol = ae.decode_stage_2_outputs(x)
        _sync(device)
        t2 = time.perf_counter()
    return {"sampler": f"MONAI DDIM {steps} + whole decode", "shape": list(vol.shape[2:]),
            "denoise_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0, **_peak(before)}


def child_synthbrain(bundle: Path, steps: int, device: torch.device, decode: str, precision: str) -> dict:
    from synthbrain.grids import FULL
    from synthbrain.sampling import Generator

    gen = Generator.from_bundle(bundle, device=str(device), precision=precision, decode=decode)
    # the same choice of what the sliced decode recomputes as at 1 mm (only the last upsampling) on a smaller grid
    gen.autoencoder.lazy_bytes = int(gen.autoencoder.lazy_bytes * math.prod(gen.grid.shape) / math.prod(FULL.shape))
    marks, before = {}, []

    def on_step(i, n, info):
        if (info or {}).get("stage") == "decode":  # announced when the solver is done, before the decode
            marks["decode"] = time.perf_counter()
            before.append(_reset_peak())

    t0 = time.perf_counter()
    s = gen.sample({}, seed=0, steps=steps, on_step=on_step)[0]
    t2 = time.perf_counter()
    t1 = marks["decode"]
    return {"sampler": f"SynthBrain DPM-Solver++ {steps} + {'sliced' if gen.sliced_decode else 'whole'} decode, "
                       f"{gen.precision}", "precision": gen.precision,
            "shape": list(s.volume.data.shape), "denoise_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0,
            **_peak(before[0])}


def child_equal(bundle: Path, grid: str, device: torch.device, precision: str) -> dict:
    """One latent decoded whole in fp32 (the reference's decode), sliced in fp32, and sliced as the
    Generator decodes at ``precision`` (its autocast): the differences from the whole fp32 decode."""
    from synthbrain.bundle import load_bundle
    from synthbrain.sampling import autocast, resolve_precision

    ae = load_bundle(bundle, components=("autoencoder",)).autoencoder.to(device)
    z = torch.randn((1, 3, *LATENTS[grid]), generator=torch.Generator().manual_seed(1)).to(device)
    resolved = resolve_precision(device, precision)
    with torch.no_grad():
        whole = ae.decode(z)
        out = {"max_abs_value": float(whole.abs().max()), "precision": resolved}
        for name, prec in (("sliced", "fp32"), ("ours", resolved)):
            if name == "ours" and prec == "fp32":
                break
            with autocast(device, prec):
                d = (ae.decode_sliced(z).float() - whole).abs()
            out[name] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                         "psnr_db": float(10 * torch.log10((whole.max() - whole.min()) ** 2 / (d ** 2).mean()))}
    return out


def _diff(what: str, d: dict) -> str:
    return (f"{what} largest absolute difference {d['max_abs_diff']:.2e}, mean {d['mean_abs_diff']:.2e}, "
            f"PSNR {d['psnr_db']:.1f} dB").lstrip()


def run_child(args: argparse.Namespace, mode: str, **paths) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--grid", args.grid, "--device", args.device,
           "--threads", str(args.threads), "--steps", str(args.steps), "--reference-steps", str(args.reference_steps),
           "--decode", args.decode, "--precision", args.precision,
           *sum(([f"--{k}", str(v)] for k, v in paths.items()), [])]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=sorted(LATENTS), default="full")
    p.add_argument("--steps", type=int, default=10, help="SynthBrain's DPM-Solver++ steps")
    p.add_argument("--reference-steps", type=int, default=50, help="the reference's DDIM steps (the bundle: 50)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", choices=("auto", "whole", "sliced"), default="sliced")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="SynthBrain's precision (auto: bf16 on a CPU with AMX tiles; the reference runs in fp32)")
    p.add_argument("--write", action="store_true", help="write the figures into benchmarks/results.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--zoo", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        result = {"reference": lambda: child_reference(args.zoo, args.grid, args.reference_steps, device),
                  "synthbrain": lambda: child_synthbrain(args.bundle, args.steps, device, args.decode, args.precision),
                  "equal": lambda: child_equal(args.bundle, args.grid, device, args.precision)}[args.child]()
        print(json.dumps(result))
        return

    from synthbrain.importers.monai_zoo import import_monai_zoo

    with tempfile.TemporaryDirectory() as tmp:
        zoo = make_zoo(Path(tmp) / "zoo", args.grid)
        bundle = import_monai_zoo(zoo, Path(tmp) / "bundle")
        rows = [run_child(args, "reference", zoo=zoo), run_child(args, "synthbrain", bundle=bundle)]
        eq = run_child(args, "equal", bundle=bundle)
    cuda = device.type == "cuda"
    lines = ["| sampler | volume | denoise (s) | decode (s) | total (s) | peak RSS (GB) | RSS before decode (GB) "
             "| peak RSS in decode (GB) |" + (" peak CUDA (GB) |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in rows:
        lines.append(f"| {r['sampler']} | {'x'.join(map(str, r['shape']))} | {r['denoise_s']:.1f} | "
                     f"{r['decode_s']:.1f} | {r['total_s']:.1f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['rss_before_decode_gb']:.2f} | {r['decode_peak_rss_gb']:.2f} |"
                     + (f" {r['peak_cuda_gb']:.2f} |" if cuda else ""))
    ours = rows[1]["precision"]
    body = "\n".join(lines) + (
        f"\n\nSame random weights of the bundle's exact networks (13.8 M + 553 M parameters), one brain, "
        f"{args.threads} threads, {args.device}; the reference in fp32, SynthBrain in {ours} (`--precision "
        f"{args.precision}`); each sampler in a fresh process (peak RSS includes the weights; the decode's peak is "
        f"read after resetting the kernel's high-water mark). One latent decoded whole in fp32 (the reference's "
        f"decode), against: " + _diff("the fp32 sliced decode:", eq["sliced"])
        + (f"; the {ours} sliced decode (SynthBrain's): " + _diff("", eq["ours"]) if "ours" in eq else "")
        + f" (values up to {eq['max_abs_value']:.2f}; PSNR over the whole decode's value range).")
    print(body)
    if args.write:
        from _results import write_section

        command = "python benchmarks/ukb_ldm.py " + " ".join(sys.argv[1:])
        write_section(f"UK Biobank LDM: time and memory per brain ({args.grid} grid, {args.device})", command, body)


if __name__ == "__main__":
    main()
