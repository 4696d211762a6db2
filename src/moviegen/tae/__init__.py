"""Temporal autoencoder (TAE): model, losses and latent statistics."""
