"""DDIM steps in both directions as pure functions of the noise schedule.

We write the update rules ourselves rather than calling `DDIMScheduler.step` so inversion and
denoising are exact mirrors of each other and the stochastic (eta > 0) noise is drawn from our
generator in a fixed order. The scheduler only supplies `alphas_cumprod` and the timesteps.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_epsilon(model_output: Tensor, sample: Tensor, alpha_prod: Tensor, prediction_type: str) -> Tensor:
    """The noise prediction from a UNet output.

    model_output, sample: (T, 4, h, w); alpha_prod: scalar ᾱ of the timestep the UNet was run at.
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_prod.sqrt() * model_output + (1 - alpha_prod).sqrt() * sample
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")


def to_x0(model_output: Tensor, sample: Tensor, alpha_prod: Tensor, prediction_type: str) -> Tensor:
    """The clean-latent prediction from a UNet output. Shapes as in `to_epsilon`."""
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_prod).sqrt() * model_output) / alpha_prod.sqrt()
    if prediction_type == "v_prediction":
        return alpha_prod.sqrt() * sample - (1 - alpha_prod).sqrt() * model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")


def inversion_step(sample: Tensor, model_output: Tensor, alpha_from: Tensor, alpha_to: Tensor,
                   prediction_type: str) -> Tensor:
    """One DDIM inversion step: from noise level ᾱ_from up to the noisier ᾱ_to (ᾱ_to < ᾱ_from).

    The UNet was run on `sample` at the target timestep (the usual DDIM-inversion approximation),
    so its output is read with ᾱ_to. sample, model_output: (T, 4, h, w).
    """
    eps = to_epsilon(model_output, sample, alpha_to, prediction_type)
    x0 = (sample - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps


def denoising_step(sample: Tensor, model_output: Tensor, alpha_t: Tensor, alpha_prev: Tensor,
                   prediction_type: str, eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One DDIM denoising step from ᾱ_t to the cleaner ᾱ_prev (Song et al., eq. 12).

    With eta > 0, `noise` (standard normal, shaped like `sample`) is added with DDIM's sigma.
    sample, model_output, noise: (T, 4, h, w).
    """
    eps = to_epsilon(model_output, sample, alpha_t, prediction_type)
    x0 = to_x0(model_output, sample, alpha_t, prediction_type)
    sigma = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).clamp(min=0).sqrt()
    direction = (1 - alpha_prev - sigma**2).clamp(min=0).sqrt() * eps
    out = alpha_prev.sqrt() * x0 + direction
    if eta > 0:
        if noise is None:
            raise ValueError("denoising_step with eta > 0 needs noise")
        out = out + sigma * noise
    return out


def score_guided_step(sample: Tensor, model_output: Tensor, alpha_t: Tensor, alpha_prev: Tensor,
                      prediction_type: str, score: Tensor | None, scale: float = 1.0) -> Tensor:
    """A deterministic DDIM step whose direction term is steered by a gradient (VideoDirector's STDG).

    The clean-latent prediction comes from the model alone; the noise of the direction term is
    ``ε − scale·sqrt(1 − ᾱ_t)·score`` (classifier guidance written on ε, Dhariwal & Nichol eq. 14):
    ``x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev)·(ε − scale·sqrt(1 − ᾱ_t)·score)``. `score` None (or scale 0)
    is the plain step. sample, model_output, score: (..., 4, h, w).
    """
    eps = to_epsilon(model_output, sample, alpha_t, prediction_type)
    x0 = to_x0(model_output, sample, alpha_t, prediction_type)
    if score is not None and scale > 0:
        eps = eps - scale * (1 - alpha_t).sqrt() * score
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def alphas_for(alphas_cumprod: Tensor, final_alpha: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """ᾱ at each timestep and at the timestep after it (the cleaner one), for descending `timesteps`.

    Returns (alpha_t, alpha_prev), each (S,), where alpha_prev[-1] is the schedule's final ᾱ.
    """
    alpha_t = alphas_cumprod[timesteps]
    alpha_prev = torch.cat([alphas_cumprod[timesteps[1:]], final_alpha.reshape(1)])
    return alpha_t, alpha_prev
