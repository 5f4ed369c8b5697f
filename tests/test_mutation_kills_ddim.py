"""DDIM maths the closed-form tests of test_known_answers.py leave open, found by `make mutate`:
VideoDirector's score-guided step and the ᾱ lookup of a timestep schedule.

References are written out in float64 from the formulas (Song et al. eq. 12; classifier guidance on ε,
Dhariwal & Nichol eq. 14), never by calling the function they check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from test_known_answers import ALPHA_PAIRS, ref_denoise, ref_eps_x0, tensors
from vidbatch.engine import ddim


def ref_score_guided(x, out, alpha_t, alpha_prev, prediction_type, score, scale):
    """x_prev = sqrt(ᾱ_prev) x0 + sqrt(1-ᾱ_prev) (ε - scale sqrt(1-ᾱ_t) score), x0 and ε from the model alone."""
    eps, x0 = ref_eps_x0(out, x, alpha_t, prediction_type)
    guided = eps - scale * math.sqrt(1 - alpha_t) * score
    return math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev) * guided


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("alpha_t, alpha_prev", ALPHA_PAIRS)
@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_score_guided_step_is_the_closed_form(prediction_type, alpha_t, alpha_prev, scale):
    x, out, score = tensors(2, 2, 4, 3, 5, count=3)
    got = ddim.score_guided_step(x.float(), out.float(), torch.tensor(alpha_t), torch.tensor(alpha_prev),
                                 prediction_type, score.float(), scale)
    want = ref_score_guided(x.numpy(), out.numpy(), alpha_t, alpha_prev, prediction_type, score.numpy(), scale)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-4, atol=2e-5)


def test_score_guided_step_default_scale_is_one():
    x, out, score = tensors(3, 1, 4, 2, 2, count=3)
    got = ddim.score_guided_step(x.float(), out.float(), torch.tensor(0.3), torch.tensor(0.55), "epsilon", score.float())
    want = ref_score_guided(x.numpy(), out.numpy(), 0.3, 0.55, "epsilon", score.numpy(), 1.0)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("score_given, scale", [(False, 1.0), (True, 0.0)])
def test_score_guided_step_without_a_score_is_the_plain_ddim_step(prediction_type, score_given, scale):
    x, out, score = tensors(4, 2, 4, 3, 5, count=3)
    got = ddim.score_guided_step(x.float(), out.float(), torch.tensor(0.30), torch.tensor(0.55), prediction_type,
                                 score.float() if score_given else None, scale)
    want = ref_denoise(x.numpy(), out.numpy(), 0.30, 0.55, prediction_type)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-4, atol=2e-5)


def test_denoising_step_default_is_deterministic():
    # eta defaults to 0: no noise is needed and the step is the deterministic closed form.
    x, out = tensors(5, 1, 4, 2, 2, count=2)
    got = ddim.denoising_step(x.float(), out.float(), torch.tensor(0.3), torch.tensor(0.55), "epsilon")
    np.testing.assert_allclose(got.double().numpy(), ref_denoise(x.numpy(), out.numpy(), 0.3, 0.55, "epsilon"),
                               rtol=2e-4, atol=2e-5)


def test_stochastic_step_needs_noise():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="noise"):
        ddim.denoising_step(x, x, torch.tensor(0.3), torch.tensor(0.55), "epsilon", eta=0.5)


@pytest.mark.parametrize("function", [ddim.to_epsilon, ddim.to_x0])
def test_unknown_prediction_type_is_refused(function):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="sample"):
        function(x, x, torch.tensor(0.5), "sample")


def test_alphas_for_reads_each_timestep_and_the_next_one():
    # ᾱ_t = t / 100 makes every lookup readable; the last step's "previous" ᾱ is the schedule's final one.
    alphas = torch.arange(100, dtype=torch.float64) / 100
    alpha_t, alpha_prev = ddim.alphas_for(alphas, torch.tensor(0.999, dtype=torch.float64), torch.tensor([81, 41, 1]))
    assert alpha_t.tolist() == pytest.approx([0.81, 0.41, 0.01])
    assert alpha_prev.tolist() == pytest.approx([0.41, 0.01, 0.999])
