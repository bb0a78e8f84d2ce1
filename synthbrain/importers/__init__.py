"""Importers: published models in other formats -> SynthBrain bundles (see synthbrain.bundle)."""
