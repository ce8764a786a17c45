"""The model, the KL and the loss: shapes, parameter count, reductions, gradients, and
the KL's correctness."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

import vae_helpers as vh


def test_shapes_and_parameter_count():
    model = vh.VAE(latent_dim=32, hidden_sizes=[100, 100])
    x = torch.randn(5, 784)
    reconstruction, mu, logvar = model(x)
    assert (
        reconstruction.shape == (5, 784)
        and mu.shape == (5, 32)
        and logvar.shape == (5, 32)
    )
    encoder = (784 * 100 + 100) + (100 * 100 + 100) + (100 * 64 + 64)
    decoder = (32 * 100 + 100) + (100 * 100 + 100) + (100 * 784 + 784)
    assert sum(p.numel() for p in model.parameters()) == encoder + decoder == 187_648


def test_output_layer_is_linear_and_reaches_the_normalized_range():
    model = vh.VAE()
    assert isinstance(model.decoder[-1], torch.nn.Linear)
    with torch.no_grad():
        model.decoder[-1].bias.fill_(2.82)
    assert (
        model.decode(torch.zeros(1, 32)).max() > 2.8
    )  # a sigmoid/tanh head could not output this


def test_closed_form_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(10, 32), torch.randn(10, 32)
    expected = torch_kl(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(vh.kl_divergence(mu, logvar), expected)


def test_closed_form_kl_matches_monte_carlo_within_three_standard_errors():
    generator = torch.Generator().manual_seed(1)
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.3, -0.7, -1.5]])
    q, prior = Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 3, generator=generator)
    log_ratio = (q.log_prob(z) - prior.log_prob(z)).sum(-1)
    estimate, standard_error = (
        log_ratio.mean(),
        log_ratio.std() / math.sqrt(len(log_ratio)),
    )
    assert abs(estimate - vh.kl_divergence(mu, logvar)[0]) < 3 * standard_error


def test_kl_is_zero_exactly_at_the_prior():
    assert vh.kl_divergence(torch.zeros(4, 32), torch.zeros(4, 32)).abs().max() == 0


def test_loss_sums_over_pixels_and_latents_then_averages_over_the_batch():
    torch.manual_seed(2)
    x, reconstruction = torch.randn(6, 784), torch.randn(6, 784)
    mu, logvar = torch.randn(6, 32), torch.randn(6, 32)
    beta = 32 / 784
    total, squared_error, kl = vh.vae_loss(reconstruction, x, mu, logvar, beta)
    per_image_sse = ((reconstruction - x) ** 2).sum(dim=1)
    per_image_kl = vh.kl_divergence(mu, logvar)
    torch.testing.assert_close(squared_error, per_image_sse.mean())
    torch.testing.assert_close(kl, per_image_kl.mean())
    torch.testing.assert_close(total, (per_image_sse + beta * per_image_kl).mean())
    # The per-element mean (ethanluoyc/pytorch-vae issue #3) would give SSE/784: far
    # from the per-image sum.
    assert squared_error > 700 * torch.nn.functional.mse_loss(reconstruction, x)


def test_loss_does_not_depend_on_the_batch_size():
    torch.manual_seed(3)
    x, reconstruction, mu, logvar = (
        torch.randn(8, 784),
        torch.randn(8, 784),
        torch.randn(8, 32),
        torch.randn(8, 32),
    )
    whole = vh.vae_loss(reconstruction, x, mu, logvar, 0.5)[0]
    halves = [
        vh.vae_loss(reconstruction[s], x[s], mu[s], logvar[s], 0.5)[0]
        for s in (slice(0, 4), slice(4, 8))
    ]
    torch.testing.assert_close(whole, sum(halves) / 2)


def test_gradients_reach_the_encoder_through_the_reparameterization():
    torch.manual_seed(4)
    model = vh.VAE()
    x = torch.randn(16, 784)
    reconstruction, mu, logvar = model(x)
    squared_error = vh.vae_loss(reconstruction, x, mu, logvar, beta=0.0)[
        1
    ]  # no KL: only the sampled path
    squared_error.backward()
    for parameter in model.encoder.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_reparameterize_samples_have_the_right_moments():
    generator = torch.Generator().manual_seed(5)
    mu, logvar = torch.full((100_000, 1), 1.5), torch.full((100_000, 1), math.log(0.25))
    z = vh.reparameterize(mu, logvar, generator)
    assert abs(z.mean() - 1.5) < 0.01 and abs(z.std() - 0.5) < 0.01


def test_gaussian_elbo_matches_the_gaussian_log_density():
    """With σ² = β/2, -loss/β - 392·log(πβ) is log N(x; x̂, σ²I) - KL for a single
    image."""
    torch.manual_seed(6)
    x, reconstruction, mu, logvar = (
        torch.randn(1, 784),
        torch.randn(1, 784),
        torch.randn(1, 32),
        torch.randn(1, 32),
    )
    beta = 0.3
    total = vh.vae_loss(reconstruction, x, mu, logvar, beta)[0]
    log_likelihood = Normal(reconstruction, math.sqrt(beta / 2)).log_prob(x).sum()
    expected = log_likelihood - vh.kl_divergence(mu, logvar)[0]
    assert vh.gaussian_elbo_nats(total.item(), beta) == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_normalization_gives_zero_mean_and_unit_std_on_the_real_training_set(config):
    images, _ = vh.load_mnist(config["data_root"], train=True)
    assert images.shape == (60000, 28, 28)
    x = vh.normalize(images)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    assert x.min().item() == pytest.approx(
        -0.4242, abs=1e-4
    ) and x.max().item() == pytest.approx(2.8215, abs=1e-4)


def test_splits_are_disjoint_seeded_and_sized_as_configured(config, mnist):
    assert [len(mnist[s][0]) for s in ("train", "validation", "test")] == [
        55000,
        5000,
        10000,
    ]
    order = torch.randperm(
        60000, generator=torch.Generator().manual_seed(config["validation_seed"])
    )
    assert (
        len(set(order[:5000].tolist()) | set(order[5000:].tolist())) == 60000
    )  # disjoint, covering all
    images, labels = vh.load_mnist(config["data_root"], train=True)
    torch.testing.assert_close(
        mnist["validation"][0][:100], vh.normalize(images[order[:100]])
    )
    torch.testing.assert_close(
        mnist["train"][0][-100:], vh.normalize(images[order[-100:]])
    )
    assert torch.equal(mnist["train"][1], labels[order[5000:]])


def test_denormalize_inverts_normalize():
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    restored = vh.denormalize(vh.normalize(images))
    torch.testing.assert_close(
        restored.reshape(3, 28, 28) * 255, images.float(), atol=1e-3, rtol=0
    )


def test_free_bits_with_a_zero_floor_is_the_plain_kl():
    torch.manual_seed(2)
    mu, logvar = torch.randn(64, 32), torch.randn(64, 32)
    torch.testing.assert_close(
        vh.free_bits_kl(mu, logvar, 0.0), vh.kl_divergence(mu, logvar).mean()
    )
    x, reconstruction = torch.randn(64, 784), torch.randn(64, 784)
    plain = vh.vae_loss(reconstruction, x, mu, logvar, 0.7)
    floored = vh.vae_loss(reconstruction, x, mu, logvar, 0.7, free_bits=1e-30)
    for a, b in zip(plain, floored):
        torch.testing.assert_close(a, b)


def test_free_bits_count_each_dimension_only_above_the_floor():
    mu = torch.zeros(8, 3)
    mu[:, 0] = 2.0  # KL 2 nats in dimension 0; dimensions 1 and 2 sit at the prior
    logvar = torch.zeros(8, 3, requires_grad=True)
    floored = vh.free_bits_kl(mu, logvar, 0.5)
    assert floored.item() == pytest.approx(2.0 + 0.5 + 0.5)
    floored.backward()
    assert logvar.grad[:, 1:].abs().max() == 0  # no gradient below the floor


def test_the_annealed_kl_weight_rises_linearly_and_reaches_beta_on_schedule():
    beta, warmup = 0.8, 5
    assert vh.kl_weight(beta, 0.0, warmup) == 0.0
    assert vh.kl_weight(beta, 2.5, warmup) == pytest.approx(0.4)
    assert vh.kl_weight(beta, warmup, warmup) == pytest.approx(beta)
    assert vh.kl_weight(beta, 11.3, warmup) == beta
    assert vh.kl_weight(beta, 0.0, 0) == beta  # no annealing: β from the first step
