"""lodas: latent diffusion data assimilation coupled to Earth-system models."""
__version__ = "0.1.0"
