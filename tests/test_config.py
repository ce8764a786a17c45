"""Each class of bad configuration gives one line that names the key, the value and what
is expected."""

import subprocess
import sys
from pathlib import Path

import pytest

import vae_helpers as vh

ROOT = Path(__file__).resolve().parent.parent


def test_the_project_config_loads_with_the_documented_defaults(config):
    assert config["beta"] == pytest.approx(32 / 784)
    assert (config["normalize_mean"], config["normalize_std"]) == (0.1307, 0.3081)
    assert config["hidden_sizes"] == [100, 100] and config["latent_dim"] == 32
    assert config["validation_size"] == 5000


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"learning_rate": -0.001},
            "'learning_rate' must be a number > 0, like 1.0e-3, got -0.001",
        ),
        ({"learning_rate": 0}, "'learning_rate' must be a number > 0"),
        ({"learning_rate": "1e-3"}, "YAML read it as text"),
        (
            {"beta": -1},
            "'beta' must be 'auto' (latent_dim / 784) or a number >= 0, got -1",
        ),
        ({"beta": "big"}, "'beta' must be 'auto'"),
        ({"latent_dim": 0}, "'latent_dim' must be an integer >= 1, got 0"),
        (
            {"hidden_sizes": [100, 0]},
            "'hidden_sizes' must be a non-empty list of integers >= 1",
        ),
        ({"hidden_sizes": 100}, "'hidden_sizes' must be a non-empty list"),
        ({"epochs": 2.5}, "'epochs' must be an integer >= 1, got 2.5"),
        ({"batch_size": True}, "'batch_size' must be an integer >= 1, got True"),
        (
            {"validation_size": 60000},
            (
                "'validation_size' must be an integer from 1 to 59999, so that training"
                " images"
            ),
        ),
        (
            {"validation_size": 0},
            "'validation_size' must be an integer from 1 to 59999",
        ),
        ({"normalize_std": 0}, "'normalize_std' must be a number > 0"),
        (
            {"device": "gpu"},
            "'device' must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'",
        ),
        (
            {"learnig_rate": 0.01},
            "unknown key 'learnig_rate' (did you mean 'learning_rate'?)",
        ),
        ({"bta": 1}, "unknown key 'bta' (did you mean 'beta'?)"),
        (
            {"kl_warmup_epochs": -1},
            "'kl_warmup_epochs' must be an integer from 0 (no KL annealing) to epochs",
        ),
        ({"kl_warmup_epochs": 30, "epochs": 20}, "'kl_warmup_epochs' must be"),
        (
            {"free_bits": -0.5},
            "'free_bits' must be a number >= 0, nats per latent dimension",
        ),
    ],
)
def test_bad_values_name_the_key_and_what_is_expected(write_config, overrides, message):
    path = write_config(overrides)
    with pytest.raises(vh.ConfigError) as error:
        vh.load_config(path)
    assert message in str(error.value)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_malformed_yaml_names_the_line(write_config):
    path = write_config("epochs: 3\nbeta: [0.1\nseed: 1\n")
    with pytest.raises(vh.ConfigError, match=r"line \d+: malformed YAML"):
        vh.load_config(path)


def test_missing_file():
    with pytest.raises(vh.ConfigError, match="config file 'nowhere.yaml' not found"):
        vh.load_config("nowhere.yaml")


def test_auto_beta_follows_the_latent_size(write_config):
    assert vh.load_config(write_config({"latent_dim": 2}))["beta"] == pytest.approx(
        2 / 784
    )


def test_paths_are_relative_to_the_config_file(write_config, tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_ROOT", raising=False)
    config = vh.load_config(write_config({"output_dir": "runs", "data_root": "mnist"}))
    assert config["output_dir"] == str(tmp_path / "runs") and config[
        "data_root"
    ] == str(tmp_path / "mnist")
    monkeypatch.setenv("MNIST_ROOT", str(tmp_path / "offline"))
    assert vh.load_config(write_config({}))["data_root"] == str(tmp_path / "offline")


def test_config_key_ignores_locations_but_not_hyperparameters(write_config):
    base = vh.load_config(write_config({}))
    assert vh.config_key(
        {**base, "output_dir": "/elsewhere", "device": "cpu"}
    ) == vh.config_key(base)
    assert vh.config_key({**base, "beta": 1.0}) != vh.config_key(base)


def test_truncated_mnist_file_gives_a_clear_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00" * 1000)
    with pytest.raises(
        vh.ConfigError,
        match="is 1000 bytes, expected 47040016: it is truncated or corrupt",
    ):
        vh.load_mnist(tmp_path, train=True, download=False)


def test_missing_mnist_says_where_to_put_the_files(tmp_path):
    with pytest.raises(
        vh.ConfigError,
        match=r"put the four uncompressed IDX files .* there, or set MNIST_ROOT",
    ):
        vh.load_mnist(tmp_path, train=True, download=False)


@pytest.mark.parametrize(
    "content, message",
    [
        ("learning_rate: -1\n", "'learning_rate' must be a number > 0"),
        ("epochs: [\n", "malformed YAML"),
        ("batchsize: 64\n", "unknown key 'batchsize' (did you mean 'batch_size'?)"),
    ],
)
def test_cli_bad_config_exits_2_with_one_line_and_no_traceback(
    write_config, content, message
):
    result = subprocess.run(
        [sys.executable, str(ROOT / "simple_vae.py"), "-c", str(write_config(content))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_missing_config_file_exits_2():
    result = subprocess.run(
        [sys.executable, str(ROOT / "simple_vae.py"), "-c", "no-such.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        result.returncode == 2
        and result.stderr.strip()
        == "error: config file 'no-such.yaml' not found "
        "(pass -c with the path to config.yaml)"
    )


def test_cli_truncated_mnist_exits_2(write_config, tmp_path):
    raw = tmp_path / "broken" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00" * 10)
    environment = {
        k: v for k, v in __import__("os").environ.items() if k != "MNIST_ROOT"
    }
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "simple_vae.py"),
            "-c",
            str(write_config({"data_root": "broken"})),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert (
        result.returncode == 2
        and "truncated or corrupt" in result.stderr
        and "Traceback" not in result.stderr
    )
