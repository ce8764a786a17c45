"""Training: determinism, checkpoints written atomically, resume after an interruption,
the NaN guard."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import vae_helpers as vh

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def quick_config(write_config, tmp_path):
    """A 3-epoch CPU config writing into a tmp folder (trained on the small real-data
    fixture)."""
    return vh.load_config(
        write_config(
            {"epochs": 3, "batch_size": 100, "device": "cpu", "output_dir": "run"}
        )
    )


def test_training_lowers_the_validation_loss_and_is_deterministic(
    quick_config, small_data
):
    model, history = vh.train(quick_config, small_data, progress=False)
    assert history["epoch"] == [1, 2, 3]
    assert history["validation_loss"][-1] < history["validation_loss"][0]
    assert len(history["frames"]) == 3 and history["frames"][0].shape == (
        vh.PROGRESS_IMAGES,
        28,
        28,
    )
    again, history_again = vh.train(quick_config, small_data, progress=False)
    assert history_again["train_loss"] == history["train_loss"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_round_trip_loads_with_weights_only(quick_config, small_data):
    model, history = vh.train(quick_config, small_data, progress=False)
    checkpoint = torch.load(vh.checkpoint_path(quick_config), weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["config"] == quick_config
    assert checkpoint["history"]["validation_loss"] == history["validation_loss"]
    loaded, loaded_history = vh.load_or_train(
        quick_config, small_data, progress=False
    )  # loads, no training
    assert loaded_history["train_loss"] == history["train_loss"]
    x = small_data["test"][0][:10]
    torch.testing.assert_close(
        loaded.decode(loaded.encode(x)[0]), model.eval().decode(model.encode(x)[0])
    )


def test_interrupted_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    vh.save_checkpoint(path, {"epoch": 1, "weights": torch.ones(3)})

    def crash_midway(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")  # save_checkpoint passes an open file
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        vh.save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(3)})
    monkeypatch.undo()
    assert vh.load_checkpoint(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_resume_continues_from_the_right_epoch_and_matches_an_uninterrupted_run(
    quick_config, small_data, monkeypatch
):
    _, uninterrupted = vh.train(quick_config, small_data, progress=False)
    original_train_epoch = vh.train_epoch

    def interrupt_at_epoch_3(*args, epoch=1, **kwargs):
        if epoch == 3:
            raise KeyboardInterrupt
        return original_train_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(vh, "train_epoch", interrupt_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        vh.train(quick_config, small_data, progress=False)
    assert vh.load_checkpoint(vh.checkpoint_path(quick_config))["epoch"] == 2
    monkeypatch.undo()
    epochs_run = []
    monkeypatch.setattr(
        vh,
        "train_epoch",
        lambda *a, epoch=1, **k: (
            epochs_run.append(epoch) or original_train_epoch(*a, epoch=epoch, **k)
        ),
    )
    _, resumed = vh.train(quick_config, small_data, resume=True, progress=False)
    assert epochs_run == [3]
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    assert resumed["validation_loss"] == uninterrupted["validation_loss"]


def test_a_checkpoint_of_another_config_is_never_used(quick_config, small_data):
    vh.train(quick_config, small_data, progress=False)
    other = {**quick_config, "beta": 1.0}
    assert vh.checkpoint_path(other) != vh.checkpoint_path(quick_config)
    vh.checkpoint_path(quick_config).rename(
        vh.checkpoint_path(other)
    )  # a checkpoint under the wrong name
    with pytest.raises(
        vh.ConfigError, match="was trained with a different config .*beta"
    ):
        vh.load_or_train(other, small_data, progress=False)


def test_nan_guard_names_the_epoch_and_batch(quick_config, small_data):
    images = small_data["train"][0].clone()
    images[7, 100] = float("nan")
    data = {**small_data, "train": (images, small_data["train"][1])}
    with pytest.raises(
        vh.TrainingDiverged,
        match=r"the loss became nan at epoch 1, batch \d+; lower learning_rate",
    ):
        vh.train(quick_config, data, progress=False)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One real command-line run (1 epoch, then the figures and the t-SNE): its folder,
    config, output and checkpoint. The tests below reuse it instead of training and
    drawing again; they run the CLI's ``main`` in this process, with a stand-in for the
    t-SNE, which this first run has already checked."""
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "config.yaml"
    path.write_text(
        yaml.safe_dump({"epochs": 1, "output_dir": "cli-run", "device": "cpu"})
    )
    command = [sys.executable, str(ROOT / "simple_vae.py"), "-c", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return folder, path, result, next(folder.glob("cli-run/vae-*.pt"))


@pytest.fixture
def fast_tsne(monkeypatch):
    """t-SNE replaced by the first two latent coordinates (the figures stay real)."""
    import sklearn.manifold

    class FirstTwo:
        def __init__(self, **kwargs):
            pass

        def fit_transform(self, means):
            return means[:, :2]

    monkeypatch.setattr(sklearn.manifold, "TSNE", FirstTwo)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # main() leaves the thread count alone


@pytest.mark.slow
def test_cli_trains_and_writes_the_figures(cli_run):
    folder, _, result, _ = cli_run
    assert "Training on cpu" in result.stdout and "Test loss" in result.stdout
    names = {p.name for p in (folder / "cli-run").iterdir()}
    assert {"recon.png", "gen.png", "progress.gif", "tsne.png", "history.json"} <= names


@pytest.mark.slow
def test_cli_reuses_a_finished_model(cli_run, fast_tsne, capsys):
    """A second run reuses the finished model: same checkpoint file, same test metrics,
    no training."""
    import simple_vae

    _, path, result, checkpoint = cli_run
    written = checkpoint.stat().st_mtime_ns
    assert simple_vae.main(["-c", str(path)]) == 0
    reused = capsys.readouterr().out
    assert "Reusing the trained model" in reused and "Training on" not in reused
    assert checkpoint.stat().st_mtime_ns == written
    test_line = [
        line for line in result.stdout.splitlines() if line.startswith("Test loss")
    ]
    assert [line for line in reused.splitlines() if line.startswith("Test loss")] == (
        test_line
    )


@pytest.mark.slow
def test_cli_refuses_to_overwrite_an_interrupted_run_and_resumes_it(
    cli_run, fast_tsne, capsys
):
    """With more epochs the checkpoint is an interrupted run: a plain run refuses to
    overwrite it, --resume continues."""
    import simple_vae

    folder, _, _, checkpoint = cli_run
    longer = folder / "longer.yaml"
    longer.write_text(
        yaml.safe_dump({"epochs": 2, "output_dir": "cli-run", "device": "cpu"})
    )
    interrupted = vh.load_checkpoint(checkpoint)
    interrupted["config"] = vh.load_config(longer)
    vh.save_checkpoint(vh.checkpoint_path(vh.load_config(longer)), interrupted)
    assert simple_vae.main(["-c", str(longer)]) == 2
    refused = capsys.readouterr().err
    assert "Traceback" not in refused and refused.strip().count("\n") == 0
    assert (
        "interrupted run (epoch 1 of 2): continue it with --resume, or start over with"
        " --retrain" in refused
    )
    assert simple_vae.main(["-c", str(longer), "--resume"]) == 0
    assert "Test loss" in capsys.readouterr().out
    assert vh.load_checkpoint(vh.checkpoint_path(vh.load_config(longer)))["epoch"] == 2


def test_fused_adam_agrees_with_the_default_adam():
    torch.manual_seed(0)
    models = [vh.VAE(latent_dim=4, hidden_sizes=[16]) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        vh.adam(models[0].parameters(), 1e-3),
        torch.optim.Adam(models[1].parameters(), lr=1e-3),
    ]
    x = torch.randn(32, 784)
    for _ in range(5):
        for model, optimizer in zip(models, optimizers):
            torch.manual_seed(1)
            reconstruction, mu, logvar = model(x)
            loss = vh.vae_loss(reconstruction, x, mu, logvar, 0.5)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_annealing_and_free_bits_train_through_the_one_loop(
    quick_config, small_data, monkeypatch
):
    config = {**quick_config, "kl_warmup_epochs": 2, "free_bits": 0.5}
    seen, original = [], vh.kl_weight
    monkeypatch.setattr(
        vh, "kl_weight", lambda *a: seen.append(original(*a)) or seen[-1]
    )
    _, history = vh.train(config, small_data, progress=False)
    assert len(history["epoch"]) == 3
    assert 0 < seen[0] < seen[-1] == config["beta"]
    assert vh.checkpoint_path(config) != vh.checkpoint_path(quick_config)
