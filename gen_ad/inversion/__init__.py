"""Inversion: map a query image to a reconstruction (encoders, projection, diffusion)."""
