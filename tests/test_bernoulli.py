"""Chapter 7's options of the helper: the Bernoulli likelihood, tanh units, dynamic
binarization, Adam's ε and Burda et al.'s learning-rate schedule (a few seconds)."""

import math
from pathlib import Path

import pytest
import yaml
import torch

import vae_helpers as vh

ROOT = Path(__file__).resolve().parent.parent
BERNOULLI_YAML = ROOT / "configs" / "bernoulli.yaml"


def is_binary(images):
    return bool(((images == 0) | (images == 1)).all())


@pytest.fixture(scope="module")
def splits():
    """The chapter's splits: training intensities in [0, 1], validation and test
    binarized once."""
    config = vh.load_config(BERNOULLI_YAML, device="cpu")
    return vh.mnist_splits(config, "cpu")


@pytest.fixture(scope="module")
def binary_data(splits):
    """2,000 training images and 300 validation and test images of ``splits``."""
    return {
        "train": tuple(t[:2000] for t in splits["train"]),
        "validation": tuple(t[:300] for t in splits["validation"]),
        "test": tuple(t[:300] for t in splits["test"]),
    }


@pytest.fixture
def quick_config(tmp_path):
    """The chapter's model, trained briefly at a large batch in a tmp folder."""
    return vh.load_config(
        BERNOULLI_YAML,
        epochs=2,
        batch_size=200,
        device="cpu",
        output_dir=str(tmp_path),
    )


# --------------------------------------------------------------------------------------
# Likelihood and model
# --------------------------------------------------------------------------------------


def test_bernoulli_log_likelihood_is_the_log_prob_summed_over_pixels():
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(5, vh.PIXELS, generator=generator)
    x = torch.bernoulli(torch.full((5, vh.PIXELS), 0.3), generator=generator)
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(dim=-1)
    assert torch.allclose(vh.bernoulli_log_likelihood(logits, x), expected, atol=1e-3)
    # the loss's reconstruction term is its negative
    mu, logvar = torch.zeros(5, 2), torch.zeros(5, 2)
    loss = vh.vae_loss(logits, x, mu, logvar, 1.0, likelihood="bernoulli")
    assert loss[1].item() == pytest.approx(-expected.mean().item(), rel=1e-5)


def test_the_config_builds_tanh_units_and_a_decoder_of_pixel_probabilities():
    config = vh.load_config(BERNOULLI_YAML)
    model = vh.model_from_config(config)
    assert model.likelihood == "bernoulli"
    assert sum(isinstance(m, torch.nn.Tanh) for m in model.modules()) == 4
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    means = model.decode(5 * torch.randn(10, config["latent_dim"]))
    assert means.shape == (10, vh.PIXELS) and 0 <= means.min() <= means.max() <= 1
    assert [m.out_features for m in model.encoder if hasattr(m, "out_features")] == [
        200,
        200,
        100,
    ]


def test_importance_weighted_estimate_with_one_sample_is_the_elbo_in_expectation(
    quick_config, binary_data
):
    model, _ = vh.train(quick_config, binary_data, progress=False)
    x = binary_data["test"][0]
    differences = []
    for seed in range(20):
        iwae = vh.importance_weighted_log_likelihood(model, x, 1.0, k=1, seed=seed)
        parts = vh.evaluate(model, x, 1.0, seed=100 + seed)
        differences.append(iwae.mean().item() + parts["reconstruction"] + parts["kl"])
    differences = torch.tensor(differences)
    standard_error = differences.std().item() / math.sqrt(len(differences))
    assert abs(differences.mean().item()) < 4 * standard_error + 1e-6
    many = vh.importance_weighted_log_likelihood(model, x, 1.0, k=100).mean().item()
    assert many > -(parts["reconstruction"] + parts["kl"])  # ℒ_100 above the ELBO


# --------------------------------------------------------------------------------------
# Binarization
# --------------------------------------------------------------------------------------


def test_the_test_set_is_binarized_once_with_a_fixed_seed(splits):
    config = vh.load_config(BERNOULLI_YAML)
    intensities = vh.load_mnist(config["data_root"], train=False)[0]
    intensities = intensities.reshape(-1, vh.PIXELS).float() / 255
    again = vh.binarize(
        intensities, torch.Generator().manual_seed(vh.BINARIZATION_SEED)
    )
    assert torch.equal(splits["test"][0], again)  # the same draw every time
    for split in ("test", "validation"):
        assert is_binary(splits[split][0])
    # the training images stay intensities, the probabilities of each epoch's draw
    assert not is_binary(splits["train"][0][:100])
    # the draw follows the intensities: about as many ones as the mean intensity says
    assert again.mean().item() == pytest.approx(intensities.mean().item(), abs=2e-3)


def test_dynamic_binarization_draws_fresh_training_images_every_epoch(
    quick_config, binary_data, monkeypatch
):
    seen = []
    original_train_epoch = vh.train_epoch

    def record(model, optimizer, images, *args, **kwargs):
        seen.append(images.clone())
        return original_train_epoch(model, optimizer, images, *args, **kwargs)

    monkeypatch.setattr(vh, "train_epoch", record)
    vh.train(quick_config, binary_data, progress=False)
    assert len(seen) == 2
    for images in seen:
        assert is_binary(images)
    disagree = (seen[0] != seen[1]).float().mean().item()
    assert disagree > 0.02  # about 5 % of the pixels are gray enough to flip
    intensities = binary_data["train"][0]
    assert seen[0].mean().item() == pytest.approx(intensities.mean().item(), abs=3e-3)


def test_fixed_binarization_binarizes_the_training_images_once(monkeypatch):
    config = vh.load_config(
        BERNOULLI_YAML, binarize="fixed", validation_size=100, device="cpu"
    )
    load_mnist = vh.load_mnist
    monkeypatch.setattr(  # 1,000 images are enough
        vh, "load_mnist", lambda *a, **k: [t[:1000] for t in load_mnist(*a, **k)]
    )
    first, second = vh.mnist_splits(config, "cpu"), vh.mnist_splits(config, "cpu")
    assert is_binary(first["train"][0])
    assert torch.equal(first["train"][0], second["train"][0])


# --------------------------------------------------------------------------------------
# Schedule and checkpoints
# --------------------------------------------------------------------------------------


def test_burda_schedule_stages_last_3_to_the_i_epochs():
    stages = [vh.burda_stage(epoch) for epoch in range(1, 41)]
    assert [stages.count(i) for i in range(4)] == [1, 3, 9, 27]
    config = vh.load_config(BERNOULLI_YAML)
    assert vh.learning_rate_at(config, 1) == pytest.approx(1e-3)
    assert vh.learning_rate_at(config, 13) == pytest.approx(1e-3 * 10 ** (-2 / 7))
    assert vh.learning_rate_at(config, 3280) == pytest.approx(1e-4)  # stage 7
    constant = vh.load_config(ROOT / "config.yaml")
    assert vh.learning_rate_at(constant, 100) == constant["learning_rate"]


def test_a_run_leaves_the_finished_checkpoint_of_each_completed_stage(
    quick_config, binary_data, monkeypatch
):
    vh.train(quick_config, binary_data, progress=False)
    stage_0 = {**quick_config, "epochs": 1}
    assert vh.checkpoint_path(stage_0).exists()
    monkeypatch.setattr(vh, "train_epoch", None)  # loading must not train
    loaded, history = vh.load_or_train(stage_0, binary_data, progress=False)
    monkeypatch.undo()
    assert history["epoch"] == [1]
    fresh, _ = vh.train(
        {**stage_0, "output_dir": quick_config["output_dir"] + "/fresh"},
        binary_data,
        progress=False,
    )
    for a, b in zip(loaded.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_adam_epsilon_reaches_the_optimizer(quick_config, binary_data, monkeypatch):
    built = []
    original_adam = torch.optim.Adam

    def spy(*args, **kwargs):
        built.append(kwargs)
        return original_adam(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    vh.train({**quick_config, "epochs": 1}, binary_data, progress=False)
    assert built[0]["eps"] == 1e-4


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


def test_the_bernoulli_config_resolves_beta_auto_to_the_elbo():
    assert vh.load_config(BERNOULLI_YAML, beta="auto")["beta"] == 1.0
    config = vh.load_config(BERNOULLI_YAML)
    assert (config["adam_epsilon"], config["batch_size"]) == (1e-4, 20)
    assert config["hidden_sizes"] == [200, 200] and config["latent_dim"] == 50


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"likelihood": "binomial"}, "'likelihood' must be one of gaussian, bernoulli"),
        ({"activation": "sigmoid"}, "'activation' must be one of relu, tanh"),
        ({"binarize": True}, "'binarize' must be one of none, dynamic, fixed"),
        ({"schedule": "cosine"}, "'schedule' must be one of constant, burda"),
        ({"adam_epsilon": 0}, "'adam_epsilon' must be a number in (0, 1)"),
        ({"adam_epsilon": "1e-4"}, "YAML read it as text"),
        ({"binarize": "none"}, "'likelihood: bernoulli' is a distribution over binary"),
        ({"normalize_mean": 0.1307}, "'binarize' needs pixel intensities in [0, 1]"),
    ],
)
def test_bad_chapter_7_keys_give_one_line_naming_the_key(
    write_config, overrides, message
):
    config = yaml.safe_load(BERNOULLI_YAML.read_text())
    config.update(overrides, data_root=".", output_dir=".")
    with pytest.raises(vh.ConfigError) as error:
        vh.load_config(write_config(config))
    assert message in str(error.value)
    assert "\n" not in str(error.value)
