"""Learn: what the two models do, shown with the live model; what synthetic data does and does not
protect; the limits of the model in use."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app_support import common, jobs, results, scans

VQ_SHOWN = "learn_vq_shown"      # this session pressed the stage-1 button (the pictures are cached)
STEPS_SHOWN = "learn_steps_shown"
MAX_STRIP = 6                    # decoded latents in the denoising strip (the noise, then up to 5 steps)


@st.cache_data(show_spinner=False, max_entries=4)
def vqvae_pictures(bundle_path: str, device: str, weights: str) -> dict:
    """The template through stage 1, as pictures and tables: the same for every user, so shared.
    ``weights`` (the autoencoder's sha256) keys the cache to the weights, not the folder."""
    from synthbrain.reconstruction import reconstruct
    from synthbrain.viz.latent import latent_png
    from synthbrain.viz.slices import orthogonal_png

    bundle = common.load_bundle_cached(bundle_path, device)
    scan = scans.builtin_scan("template", 0, bundle.grid.name)
    recon = jobs.run(lambda _: reconstruct(bundle, scan.volume, device=device), "", show=False)
    return {"original": orthogonal_png(recon.original, title="The scan (MNI152 template, preprocessed)", width_px=800),
            "reconstruction": orthogonal_png(recon.reconstruction, title="Decoded from its codes", width_px=800),
            "latent": latent_png(recon.latent, recon.indices, width_px=800),
            "latent_shape": tuple(recon.latent.shape),
            "codes_used": None if recon.indices is None else int(np.unique(recon.indices).size),
            "metrics": results.metrics_rows(recon), "compression": results.compression_rows(recon)}


@st.cache_data(show_spinner=False, max_entries=8)
def denoising_picture(bundle_path: str, device: str, weights: str, seed: int, steps: int) -> tuple[bytes, list[str]]:
    """One sample's denoising: the starting noise and a few of the sampler's steps, each latent
    decoded. Built-in inputs only (typical conditions, a seed), so shared by everyone."""
    from synthbrain.viz.latent import denoising_png

    generator = common.generator_cached(bundle_path, device)
    shown = sorted({int(round(s)) for s in np.linspace(1, steps, min(steps, MAX_STRIP - 1))})
    seen = jobs.run(lambda _: list(generator.denoising_steps(None, seed=seed, steps=steps, shown=shown)), "",
                    show=False)
    labels = [d.label for d in seen]
    return denoising_png([d.latent for d in seen], [d.volume for d in seen], labels), labels


bundle = common.current_bundle()
schema = bundle.schema
ae_cfg = bundle.autoencoder.config
grid = bundle.grid
latent_shape = ae_cfg.latent_shape(grid.shape)
weights = bundle.config["autoencoder"].get("sha256", "")
n_voxels = int(np.prod(grid.shape))
n_codes = int(np.prod(latent_shape[1:]))
kl = getattr(ae_cfg, "num_embeddings", None) is None  # an imported KL autoencoder: a continuous latent, no codebook
STAGE1 = "KL autoencoder" if kl else "VQ-VAE"

st.markdown(
    "SynthBrain makes a brain in two stages, after the King's College London Synthetic Brain Project. "
    + ("**Stage 1**, a KL-regularised autoencoder, learns to squeeze a whole 3D scan into a small grid of numbers "
       "and back. " if kl else
       "**Stage 1**, a VQ-VAE, learns to squeeze a whole 3D scan into a small grid of codes and back. ") +
    "**Stage 2**, a latent diffusion model (the *prior*), learns to make new latent grids from noise, steered by "
    "conditions such as age and sex. Decoding a new grid gives a new brain, and measuring its brain and "
    "ventricular volume checks that the conditions were followed. Everything below runs the model you are "
    f"using now (**{bundle.name}**).")
if common.is_phantom(bundle):
    st.info(common.PHANTOM_NOTE, icon=":material/info:")

# ------------------------------------------------------------------------------------------ stage 1
st.header("1. The KL autoencoder: a brain as a small grid of numbers" if kl
          else "1. The VQ-VAE: a brain as a small grid of codes")
encoder = (f"A scan on this model's grid has {' x '.join(map(str, grid.shape))} = {n_voxels:,} voxels. The encoder, "
           f"a 3D convolutional network, shrinks it {ae_cfg.downsampling} times along each axis to a latent grid of "
           f"{' x '.join(map(str, latent_shape[1:]))} = {n_codes:,} positions with {latent_shape[0]} channels each. ")
if kl:
    st.markdown(
        encoder + "The latent stays continuous: during training a KL penalty keeps it close to a standard normal "
        "distribution, so that the prior can model it, and nothing is rounded to a codebook. The decoder turns the "
        "latent back into a volume. What the reconstruction misses is what the latent cannot hold.")
else:
    st.markdown(
        encoder + f"*Vector quantisation* then replaces every position's {latent_shape[0]} numbers by the nearest of "
        f"{ae_cfg.num_embeddings} learned codebook vectors, so the whole brain becomes {n_codes:,} code numbers. The "
        "decoder turns the codes back into a volume. What the reconstruction misses is what the codes cannot hold.")
if st.button("Encode and decode the template", key="learn_vq_go", icon=":material/play_arrow:"):
    st.session_state[VQ_SHOWN] = True
if st.session_state.get(VQ_SHOWN):
    with st.spinner(f"Encoding and decoding the template through the {STAGE1}…"):
        vq = vqvae_pictures(str(bundle.path), common.device(), weights)
    scan_col, recon_col = st.columns(2)
    scan_col.image(vq["original"])
    recon_col.image(vq["reconstruction"])
    codes_col, numbers_col = st.columns([3, 2])
    codes_col.image(vq["latent"])
    with numbers_col:
        codes = ("Top row: the code chosen at each position (one colour per code; "
                 f"{vq['codes_used']} of the {ae_cfg.num_embeddings} codes appear in this scan). Other rows: the "
                 "latent's channels" if not kl else "Each row: one of the latent's channels")
        st.markdown(f"**The latent grid**, axial slices. {codes} (red positive, blue negative). Each square stands "
                    f"for {ae_cfg.downsampling}³ voxels of the scan.")
        st.markdown("**How close the reconstruction is**")
        st.table(pd.DataFrame(vq["metrics"]), hide_index=True)
        st.markdown("**How small the latent is**" if kl else "**How small the codes are**")
        st.table(pd.DataFrame(vq["compression"]), hide_index=True)
    st.caption("The Compare page does this for any scan, with the two volumes side by side and their difference.")

# ------------------------------------------------------------------------------------------- prior
st.header("2. The prior: from noise to a brain")
st.markdown(
    "The prior never sees voxels: it works on the latent grid. Training takes real latents, adds random noise of "
    "a random strength, and teaches a 3D U-Net to tell the noise from the brain, given the subject's conditions. "
    "Sampling runs this backwards: start from pure noise and remove a little at each step (the DPM-Solver++ "
    "sampler, which needs only a handful of steps). "
    "*Guidance* compares the network's answer with and without the conditions and exaggerates the difference, so "
    "the conditions are followed more closely. Below, each step's latent is decoded by the "
    f"{STAGE1} to show where the sampler is.")
if not bundle.has_prior:
    st.warning(f"{bundle.name} has no prior (stage 2), so it cannot sample; choose another bundle to see this.")
else:
    c1, c2, _ = st.columns([1, 1, 2])
    seed = c1.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="learn_seed")
    steps = c2.slider("Steps", 2, 50, int(bundle.prior.config.default_steps), key="learn_steps")
    if st.button("Show the denoising steps", key="learn_steps_go", icon=":material/play_arrow:"):
        st.session_state[STEPS_SHOWN] = True
    if st.session_state.get(STEPS_SHOWN):
        with st.spinner("Sampling…"):
            strip, labels = denoising_picture(str(bundle.path), common.device(), weights + bundle.config.get(
                "prior", {}).get("sha256", ""), int(seed), int(steps))
        st.image(strip, caption=(
            "Top: one channel of the latent (middle axial slice). Bottom: that latent decoded (axial slice). "
            "The conditions are the schema's defaults with age- and sex-typical volumes."))

# ----------------------------------------------------------------------------------------- privacy
st.header("3. Why synthetic data protects privacy, and what it does not guarantee")
st.markdown(
    "- **No record is a person.** A sample is decoded from noise; it has no subject, no scan date, no face "
    "(training scans are skull-stripped). Sharing synthetic scans shares what the model learned about a "
    "population, not anyone's scan.\n"
    "- **But a model can memorise.** A generative model trained too long on too few scans can reproduce a "
    "training scan almost exactly, or an unusual subject's anatomy; rare conditions (a very old age, a rare "
    "diagnosis) make this more likely. Then a \"synthetic\" scan *is* a person's.\n"
    "- **So check before sharing.** Compare every synthetic sample with its nearest training scan (for example "
    "by MS-SSIM or correlation) and look at the closest pairs; a sample much closer to one training scan than "
    "training scans are to each other is a warning. Such an audit finds copies; it is not a proof of privacy. "
    "Formal guarantees need training with differential privacy, which this model does not use.\n"
    "- **Conditions leak too.** A released cohort's participants.tsv shows the requested conditions; a model "
    "trained on a small, identifiable group tells something about that group.")

# ------------------------------------------------------------------------------------------ limits
st.header("4. The limits of this model")
ae_info, prior_info = bundle.config.get("autoencoder", {}), bundle.config.get("prior", {})
facts = [f"Grid: {grid.name}, {' x '.join(map(str, grid.shape))} voxels at {grid.spacing:g} mm: detail finer than "
         f"about {2 * grid.spacing:g} mm (thin cortex, small vessels) is below what it can show."]
for name, info in ((STAGE1, ae_info), ("Prior", prior_info)):
    if info:
        data = info.get("data_fingerprint", {})
        facts.append(f"{name}: trained for {info.get('steps_trained', '?')} steps on "
                     f"{data.get('subjects', '?')} subjects of *{data.get('name', 'unnamed data')}*.")
if common.is_phantom(bundle):
    facts += [
        "Trained on a **phantom** cohort: every subject is the MNI152 template deformed by a simple ageing model "
        "(ventricles grow, the brain shrinks, head size depends on sex). It has seen one anatomy, not a "
        "population: its samples look like the template, and its ageing is the phantom's rules, not biology.",
        "Its volumes are measured by the project's own segmentation, tuned on the same phantom.",
        "A short-trained prior makes blurred or blob-like brains; where a sample has no grey / white matter "
        "contrast its volumes cannot be measured and show as n/a."]
facts.append("For teaching and methods development only: not for diagnosis, and not a substitute for real data.")
st.markdown("\n".join(f"- {f}" for f in facts))
st.caption("The Model page shows this bundle's full model card, configuration and metrics.")
