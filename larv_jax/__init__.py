"""larv_jax: data-free merging of fine-tuned CLIP ViTs in JAX, with the LARV veneer."""

__version__ = "0.1.0"
