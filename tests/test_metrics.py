"""The evaluation metrics of chapter 5: Fréchet distance, importance-weighted
log-likelihood, active units, the KL of
a Gaussian fit to the prior, and the reference classifier."""

import math
from pathlib import Path

import pytest
import torch

import vae_helpers as vh

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def briefly_trained(tmp_path_factory, mnist):
    """A VAE trained for 2 epochs on 2,000 real training images (about a second), and
    300 test images."""
    config = vh.load_config(
        ROOT / "config.yaml",
        epochs=2,
        batch_size=100,
        device="cpu",
        output_dir=str(tmp_path_factory.mktemp("run")),
    )
    data = {
        "train": tuple(t[:2000] for t in mnist["train"]),
        "validation": tuple(t[:500] for t in mnist["validation"]),
    }
    model, _ = vh.train(config, data, progress=False)
    return model.eval(), mnist["test"][0][:300], config["beta"]


# --------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------


def test_frechet_distance_of_a_set_to_itself_is_zero():
    features = torch.randn(
        2000, 16, generator=torch.Generator().manual_seed(0)
    ) @ torch.randn(16, 16)
    assert vh.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift():
    features = torch.randn(1000, 8, generator=torch.Generator().manual_seed(1))
    shift = torch.arange(8.0) / 4
    assert vh.frechet_distance(features, features + shift) == pytest.approx(
        shift.pow(2).sum().item(), rel=1e-6
    )


def test_frechet_distance_matches_the_closed_form_for_two_gaussians():
    # N(0, diag(s_a²)) and N(δ, diag(s_b²)): the distance is ‖δ‖² + Σ (s_a − s_b)².
    generator = torch.Generator().manual_seed(2)
    scale_a, scale_b, delta = (
        torch.tensor([1.0, 2.0, 0.5, 1.5]),
        torch.tensor([2.0, 1.0, 0.5, 3.0]),
        torch.ones(4),
    )
    a = torch.randn(50000, 4, generator=generator) * scale_a
    b = torch.randn(50000, 4, generator=generator) * scale_b + delta
    closed_form = delta.pow(2).sum() + (scale_a - scale_b).pow(2).sum()
    assert closed_form.item() == pytest.approx(8.25)
    assert vh.frechet_distance(a, b) == pytest.approx(closed_form.item(), rel=0.03)


def test_frechet_distance_agrees_with_the_eigenvalues_of_the_covariance_product():
    # Non-commuting covariances: tr (C_a C_b)^½ = Σ √λ over the (real, positive)
    # eigenvalues λ of C_a C_b.
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(500, 6, generator=generator) @ torch.randn(
        6, 6, generator=generator
    )
    b = (
        torch.randn(500, 6, generator=generator)
        @ torch.randn(6, 6, generator=generator)
        + 0.3
    )
    cov_a, cov_b = torch.cov(a.double().T), torch.cov(b.double().T)
    trace_root = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    expected = (
        (a.double().mean(0) - b.double().mean(0)).pow(2).sum()
        + cov_a.trace()
        + cov_b.trace()
        - 2 * trace_root
    )
    assert vh.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-6)
    assert vh.frechet_distance(a, b) > 0


# --------------------------------------------------------------------------------------
# Importance-weighted log-likelihood
# --------------------------------------------------------------------------------------


def test_importance_weighted_estimate_with_one_sample_is_the_elbo_in_expectation(
    briefly_trained,
):
    model, x, beta = briefly_trained
    # The same 300 images for every seed, so the spread over seeds is Monte Carlo noise
    # only.
    differences = torch.tensor(
        [
            vh.importance_weighted_log_likelihood(model, x, beta, k=1, seed=seed)
            .mean()
            .item()
            - vh.gaussian_elbo_nats(
                vh.evaluate(model, x, beta, seed=100 + seed)["loss"], beta
            )
            for seed in range(20)
        ]
    )
    standard_error = differences.std().item() / math.sqrt(len(differences))
    assert abs(differences.mean().item()) < 4 * standard_error + 1e-6


def test_importance_weighted_estimate_grows_with_k(briefly_trained):
    model, x, beta = briefly_trained
    estimates = [
        vh.importance_weighted_log_likelihood(model, x, beta, k=k).mean().item()
        for k in (1, 10, 100)
    ]
    assert estimates[0] < estimates[1] < estimates[2]
    assert (
        estimates[2] < 0
    )  # a density of 784 continuous pixels with σ² = β/2 < 1: far below 0 nats here


def test_importance_weighted_estimate_processes_chunks_like_one_batch(briefly_trained):
    model, x, beta = briefly_trained
    whole = vh.importance_weighted_log_likelihood(
        model, x[:40], beta, k=5, max_decodes=1000
    )
    chunked = vh.importance_weighted_log_likelihood(
        model, x[:40], beta, k=5, max_decodes=50
    )
    assert whole.shape == (40,) and torch.isfinite(whole).all()
    # Different chunking draws z in a different order: equal in distribution, close in
    # mean.
    assert abs(whole.mean() - chunked.mean()) < 0.1 * whole.std()


# --------------------------------------------------------------------------------------
# Active units and the KL per dimension
# --------------------------------------------------------------------------------------


def test_a_collapsed_encoder_has_no_active_units_and_a_trained_one_has_some(
    briefly_trained,
):
    model, x, beta = briefly_trained
    count, variances = vh.active_units(model, x)
    assert (
        count >= 1
        and count == int((variances > 0.01).sum())
        and variances.shape == (model.latent_dim,)
    )
    collapsed = vh.VAE(model.latent_dim)
    collapsed.load_state_dict(model.state_dict())
    last = collapsed.encoder[-1]
    with torch.no_grad():
        last.weight[: model.latent_dim] = 0  # μ(x) = the bias: the same for every image
    count, variances = vh.active_units(collapsed, x)
    assert count == 0 and variances.max() < 1e-10


def test_kl_per_dimension_sums_to_the_closed_form_kl(briefly_trained):
    model, x, beta = briefly_trained
    per_dimension = vh.kl_per_dimension(model, x)
    assert per_dimension.shape == (model.latent_dim,) and (per_dimension >= 0).all()
    assert per_dimension.sum().item() == pytest.approx(
        vh.evaluate(model, x, beta)["kl"], rel=1e-4
    )


# --------------------------------------------------------------------------------------
# Drift of the aggregate posterior from the prior
# --------------------------------------------------------------------------------------


def test_gaussian_fit_kl_to_prior():
    generator = torch.Generator().manual_seed(4)
    prior_samples = torch.randn(20000, 4, generator=generator)
    assert vh.gaussian_fit_kl_to_prior(prior_samples) == pytest.approx(0.0, abs=0.01)
    shift = torch.tensor(
        [1.0, -1.0, 0.0, 2.0]
    )  # N(m, I) against N(0, I): KL = ‖m‖² / 2 = 3
    assert vh.gaussian_fit_kl_to_prior(prior_samples + shift) == pytest.approx(
        3.0, abs=0.05
    )
    # 1-D N(0, s²) against N(0, 1): KL = (s² − 1 − ln s²) / 2.
    assert vh.gaussian_fit_kl_to_prior(3 * prior_samples[:, :1]) == pytest.approx(
        (9 - 1 - math.log(9)) / 2, rel=0.03
    )
    # A collapsed posterior (μ = 0, σ² = 1 for every image) is the prior itself: with
    # the variances, KL = 0.
    assert vh.gaussian_fit_kl_to_prior(
        torch.zeros(100, 4), torch.ones(100, 4)
    ) == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------------------
# The reference classifier
# --------------------------------------------------------------------------------------


def test_class_histogram_entropy():
    assert vh.class_histogram_entropy(torch.eye(10).repeat(7, 1)) == pytest.approx(
        math.log(10)
    )
    assert vh.class_histogram_entropy(torch.eye(10)[[3] * 50]) == 0.0


def test_classifier_is_trained_once_cached_and_reloaded(tmp_path, mnist):
    config = vh.load_config(ROOT / "config.yaml", output_dir=str(tmp_path))
    settings = {**vh.CLASSIFIER_SETTINGS, "hidden_sizes": [64, 32], "epochs": 3}
    data = {"train": tuple(t[:5000] for t in mnist["train"])}
    path = vh.classifier_path(config, settings)
    assert (
        path != vh.classifier_path(config)
        and path.parent == tmp_path
        and not path.exists()
    )
    classifier = vh.load_or_train_classifier(config, data, settings)
    assert path.exists()
    x, labels = mnist["test"][0][:500], mnist["test"][1][:500]
    features, probabilities = vh.classifier_outputs(classifier, x)
    assert features.shape == (500, 32) and (features >= 0).all()
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(500))
    assert (
        probabilities.argmax(dim=1) == labels
    ).float().mean() > 0.8  # 3 epochs on 5,000 images
    written = path.stat().st_mtime_ns
    reloaded = vh.load_or_train_classifier(
        config, data, settings
    )  # loaded from the file, not trained again
    assert path.stat().st_mtime_ns == written
    torch.testing.assert_close(vh.classifier_outputs(reloaded, x)[1], probabilities)
