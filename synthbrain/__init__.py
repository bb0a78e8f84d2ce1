"""SynthBrain: synthetic 3D T1 brain MRI.

Stage 1 is a VQ-VAE that compresses a brain volume to a latent grid 8x smaller per axis, stage 2 a
conditional latent diffusion model that samples new latents for a requested age, sex, ventricular
volume and brain volume. Everything lives in MNI152 2009 space, RAS+ (see ``synthbrain.grids``).

This module stays import-light: ``import synthbrain`` must not import torch.
"""

__version__ = "0.1.0"
