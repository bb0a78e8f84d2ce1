"""Streamlit-side helpers of the SynthBrain app (the library, synthbrain/, never imports streamlit)."""
