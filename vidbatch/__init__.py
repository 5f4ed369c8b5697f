"""vidbatch: batch editing and stylisation of video datasets with pretrained text-to-image diffusion models."""

__version__ = "0.1.0"
