"""Shared helpers for the VAE book: configuration, MNIST data, the model, the loss,
training and display.

Every chapter and the command line (``simple_vae.py``) import this one module, so the
algorithm is written once. It is deliberately plain: small functions and one
``nn.Module``.
"""

import difflib
import hashlib
import io
import json
import math
import os
import re
import reprlib
import time
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

PIXELS = 28 * 28  # an MNIST image, flattened
MNIST_FILES = {  # the four IDX files torchvision reads, with their exact sizes in bytes
    "train-images-idx3-ubyte": 16 + 60000 * PIXELS,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * PIXELS,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}
MNIST_HEADERS = {  # their IDX headers: magic number (2051 images, 2049 labels), sizes
    "train-images-idx3-ubyte": [2051, 60000, 28, 28],
    "train-labels-idx1-ubyte": [2049, 60000],
    "t10k-images-idx3-ubyte": [2051, 10000, 28, 28],
    "t10k-labels-idx1-ubyte": [2049, 10000],
}


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad configuration or input, explained in one line."""


DEFAULT_CONFIG = {
    "data_root": "data",
    "normalize_mean": 0.1307,
    "normalize_std": 0.3081,
    "validation_size": 5000,
    "validation_seed": 0,
    "hidden_sizes": [100, 100],
    "latent_dim": 32,
    "beta": "auto",
    "epochs": 20,
    "batch_size": 128,
    "learning_rate": 1.0e-3,
    "kl_warmup_epochs": 0,
    "free_bits": 0.0,
    "seed": 0,
    "device": "auto",
    "output_dir": "outputs",
    # Chapter 7 (a Bernoulli VAE against Burda et al.'s benchmark):
    "likelihood": "gaussian",
    "activation": "relu",
    "binarize": "none",
    "adam_epsilon": 1.0e-8,
    "schedule": "constant",
}
TRAINING_SET_SIZE = 60000
# Keys that change where things are, not what is trained: they are left out of a
# checkpoint's identity.
LOCATION_KEYS = ("data_root", "device", "output_dir")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short_repr(value):
    """``repr`` cut to a few items and characters: any value fits in one line."""
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = 60
    try:
        return shortener.repr(value)
    except ValueError:  # an integer too long to print
        return f"an integer of {value.bit_length()} bits"


def _number_as_text_hint(value, integer=False):
    """Why YAML read a number as text, and how to write it (PyYAML follows YAML 1.1: a
    float needs a dot, and an exponent needs its sign: 1.0e-3, 1.0e+9)."""
    try:
        number = float(value)
    except ValueError:
        return ""
    text = value.strip()
    if integer and number.is_integer() and abs(number) < 1e18:
        return f" (YAML read it as text: write {int(number)})"
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text):
        mantissa, exponent = re.split("[eE]", text)
        mantissa += "" if "." in mantissa else ".0"
        exponent = exponent if exponent[0] in "+-" else "+" + exponent
        return (
            f" (YAML read it as text: write {mantissa}e{exponent}, with a dot and a"
            " signed exponent)"
        )
    return " (YAML read it as text: write the number without quotes)"


def _check(key, value, ok, expected):
    if not ok:
        hint = ""
        if isinstance(value, str):
            hint = _number_as_text_hint(value, integer="integer" in expected)
        raise ConfigError(f"'{key}' must be {expected}, got {_short_repr(value)}{hint}")


def _missing_device(name):
    """Why the valid device name ``name`` is not usable on this machine, or None."""
    with warnings.catch_warnings():  # a broken CUDA install warns; the error says it
        warnings.simplefilter("ignore")
        if name.startswith("cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                return "PyTorch sees no CUDA GPU on this machine; use auto or cpu"
            if int(name[5:] or 0) >= count:
                return (
                    f"PyTorch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1};"
                    " use one of them, auto or cpu"
                )
        mps = getattr(torch.backends, "mps", None)
        if name == "mps" and not (mps and mps.is_available()):
            return (
                "Apple's MPS is not available on this machine (it needs an Apple"
                " silicon Mac); use auto or cpu"
            )
    return None


def validate_config(config):
    """Check every key of a configuration dict; return a new dict with defaults filled
    in and β resolved.

    Each problem raises ``ConfigError`` with one line naming the key, the value and what
    is expected.
    """
    if not isinstance(config, dict):
        raise ConfigError(
            "the configuration must be a mapping of keys to values, got"
            f" {type(config).__name__}"
        )
    for key in config:
        if key not in DEFAULT_CONFIG:
            close = difflib.get_close_matches(str(key), DEFAULT_CONFIG, n=1)
            hint = (
                f" (did you mean '{close[0]}'?)"
                if close
                else f" (known keys: {', '.join(DEFAULT_CONFIG)})"
            )
            raise ConfigError(f"unknown key '{key}'{hint}")
    c = {**DEFAULT_CONFIG, **config}
    for key in ("data_root", "output_dir"):
        _check(
            key,
            c[key],
            isinstance(c[key], str) and c[key].strip() != "" and "\0" not in c[key],
            "a non-empty path",
        )
    _check(
        "normalize_mean",
        c["normalize_mean"],
        _is_number(c["normalize_mean"]) and 0 <= c["normalize_mean"] <= 1,
        "a number in [0, 1] (the training pixel mean, 0.1307)",
    )
    _check(
        "normalize_std",
        c["normalize_std"],
        _is_number(c["normalize_std"]) and c["normalize_std"] > 0,
        "a number > 0 (the training pixel std, 0.3081)",
    )
    _check(
        "validation_size",
        c["validation_size"],
        _is_int(c["validation_size"]) and 1 <= c["validation_size"] < TRAINING_SET_SIZE,
        f"an integer from 1 to {TRAINING_SET_SIZE - 1}, so that training images remain",
    )
    for key in ("validation_seed", "seed"):
        _check(
            key,
            c[key],
            _is_int(c[key]) and 0 <= c[key] < 2**63,
            "an integer >= 0 (below 2**63)",
        )
    sizes = c["hidden_sizes"]
    _check(
        "hidden_sizes",
        sizes,
        isinstance(sizes, list)
        and len(sizes) > 0
        and all(_is_int(s) and s >= 1 for s in sizes),
        "a non-empty list of integers >= 1, like [100, 100]",
    )
    for key in ("latent_dim", "epochs", "batch_size"):
        _check(key, c[key], _is_int(c[key]) and c[key] >= 1, "an integer >= 1")
    _check(
        "batch_size",
        c["batch_size"],
        c["batch_size"] <= TRAINING_SET_SIZE - c["validation_size"],
        "at most the number of training images",
    )
    _check(
        "beta",
        c["beta"],
        c["beta"] == "auto"
        or (_is_number(c["beta"]) and c["beta"] >= 0 and math.isfinite(c["beta"])),
        "'auto' (latent_dim / 784) or a number >= 0",
    )
    _check(
        "learning_rate",
        c["learning_rate"],
        _is_number(c["learning_rate"])
        and c["learning_rate"] > 0
        and math.isfinite(c["learning_rate"]),
        "a number > 0, like 1.0e-3",
    )
    _check(
        "kl_warmup_epochs",
        c["kl_warmup_epochs"],
        _is_int(c["kl_warmup_epochs"]) and 0 <= c["kl_warmup_epochs"] <= c["epochs"],
        "an integer from 0 (no KL annealing) to epochs",
    )
    _check(
        "free_bits",
        c["free_bits"],
        _is_number(c["free_bits"])
        and c["free_bits"] >= 0
        and math.isfinite(c["free_bits"]),
        "a number >= 0, nats per latent dimension (0: no free bits)",
    )
    device = c["device"]
    _check(
        "device",
        device,
        isinstance(device, str)
        and (
            device in ("auto", "cpu", "cuda", "mps")
            or (device.startswith("cuda:") and device[5:].isdigit())
        ),
        "one of auto, cpu, cuda, cuda:N, mps",
    )
    _check_chapter7_keys(c)
    missing = _missing_device(device) if device != "auto" else None
    if missing:
        raise ConfigError(f"'device' is {device!r}, but {missing}")
    if c["beta"] == "auto":
        c["beta"] = 1.0 if c["likelihood"] == "bernoulli" else c["latent_dim"] / PIXELS
    c["beta"] = float(c["beta"])
    c["learning_rate"] = float(c["learning_rate"])
    c["free_bits"] = float(c["free_bits"])
    c["adam_epsilon"] = float(c["adam_epsilon"])
    return c


CHOICES = {
    "likelihood": ("gaussian", "bernoulli"),
    "activation": ("relu", "tanh"),
    "binarize": ("none", "dynamic", "fixed"),
    "schedule": ("constant", "burda"),
}


def _check_chapter7_keys(c):
    """The keys of the Bernoulli VAE (chapter 7): the decoder's likelihood, the hidden
    activation, the binarization of the images, Adam's ε and the learning-rate schedule.
    """
    for key, choices in CHOICES.items():
        _check(key, c[key], c[key] in choices, "one of " + ", ".join(choices))
    _check(
        "adam_epsilon",
        c["adam_epsilon"],
        _is_number(c["adam_epsilon"]) and 0 < c["adam_epsilon"] < 1,
        "a number in (0, 1), like 1.0e-8 (PyTorch's default) or 1.0e-4",
    )
    if c["binarize"] != "none" and (c["normalize_mean"], c["normalize_std"]) != (0, 1):
        raise ConfigError(
            "'binarize' needs pixel intensities in [0, 1] as probabilities: set"
            " normalize_mean: 0.0 and normalize_std: 1.0"
        )
    if c["likelihood"] == "bernoulli" and c["binarize"] == "none":
        raise ConfigError(
            "'likelihood: bernoulli' is a distribution over binary pixels: set"
            " binarize to dynamic or fixed"
        )


# A config is a few hundred bytes: a bigger file than this is refused before parsing.
CONFIG_MAX_BYTES = 1_000_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML alone
    keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in first_line
            except TypeError:  # an unhashable key: PyYAML explains it below
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {_short_repr(key)} (first on line"
                    f" {first_line[key] + 1}); keep one",
                    problem_mark=key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path):
    """The YAML document in the file ``path``; ``ConfigError`` naming the line if it is
    not one."""
    if not path.is_file():
        problem = "is not a regular file" if path.exists() else "not found"
        raise ConfigError(
            f"config file '{path}' {problem} (pass -c with the path to config.yaml)"
        )
    try:
        size = path.stat().st_size
        if size > CONFIG_MAX_BYTES:
            raise ConfigError(
                f"config file '{path}' is {size / 1e6:.1f} MB, but a config is a few"
                " hundred bytes: pass -c with the path to config.yaml"
            )
        text = path.read_bytes()  # PyYAML finds the encoding (UTF-8 or UTF-16)
    except OSError as error:
        raise ConfigError(
            f"cannot read config file '{path}' ({error.strerror}); check its"
            " permissions"
        ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        kind = "" if problem.startswith("duplicate key") else "malformed YAML: "
        raise ConfigError(f"{path}{where}: {kind}{problem}") from None
    except (RecursionError, ValueError) as error:  # deep nesting, a 5,000-digit int
        problem = "nested too deeply" if isinstance(error, RecursionError) else error
        raise ConfigError(f"{path}: malformed YAML: {problem}") from None


def load_config(path="config.yaml", **overrides):
    """Read a YAML config, apply ``overrides``, validate it and resolve paths relative
    to the file's folder (``~`` is your home folder).

    The environment variable ``MNIST_ROOT``, when set, replaces ``data_root`` (CI and
    offline copies use it).
    """
    path = Path(path).expanduser()
    raw = _read_yaml(path)
    raw = {} if raw is None else raw
    try:
        config = validate_config(
            raw
            if not overrides
            else {**raw, **overrides}
            if isinstance(raw, dict)
            else raw
        )
        for key in ("data_root", "output_dir"):
            try:
                folder = Path(config[key]).expanduser()
                config[key] = str((path.parent / folder).resolve())
            except (OSError, RuntimeError, ValueError) as error:
                raise ConfigError(
                    f"'{key}' is {config[key]!r}, not a usable path ({error})"
                ) from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if os.environ.get("MNIST_ROOT"):
        config["data_root"] = str(Path(os.environ["MNIST_ROOT"]).expanduser().resolve())
    return config


def config_key(config):
    """A short hash of everything that changes the trained model: a checkpoint's
    identity."""
    identity = {k: v for k, v in sorted(config.items()) if k not in LOCATION_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[
        :12
    ]


def select_device(name="auto"):
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def check_mnist_files(root):
    """Raise ``ConfigError`` naming the file if an MNIST file under ``root/MNIST/raw``
    exists but is not the file torchvision expects: the wrong size (truncated), the
    wrong IDX header (magic number, count, 28 × 28), or a label outside 0 to 9.

    torchvision would fail on such a file with an empty ``AssertionError``, or load it.
    Missing files are left to torchvision, which downloads them.
    """
    raw = Path(root) / "MNIST" / "raw"
    fix = "delete it to download it again, or copy a good one there"
    for name, size in MNIST_FILES.items():
        file = raw / name
        if not file.exists():
            continue
        try:
            actual = file.stat().st_size
            if not file.is_file():
                raise ConfigError(f"MNIST file {file} is not a regular file; {fix}")
            if actual != size:
                raise ConfigError(
                    f"MNIST file {file} is {actual} bytes, expected {size}: it is"
                    f" truncated or corrupt; {fix}"
                )
            expected = MNIST_HEADERS[name]
            with open(file, "rb") as stream:
                head = stream.read(4 * len(expected))
                labels = stream.read() if "labels" in name else b""
        except OSError as error:
            raise ConfigError(
                f"cannot read MNIST file {file} ({error.strerror}); check its"
                f" permissions, or {fix}"
            ) from None
        header = [
            int.from_bytes(head[i : i + 4], "big") for i in range(0, len(head), 4)
        ]
        if header != expected:
            raise ConfigError(
                f"MNIST file {file} has the IDX header {header}, expected {expected}:"
                f" it is not this MNIST file, or it is corrupt; {fix}"
            )
        if labels and max(labels) > 9:
            raise ConfigError(
                f"MNIST file {file} holds a label {max(labels)}, expected 0 to 9: it is"
                f" corrupt; {fix}"
            )


def load_mnist(root, train=True, download=True):
    """The MNIST training (60,000) or test (10,000) images as a uint8 tensor (N, 28,
    28), and their labels.

    Uses ``torchvision.datasets.MNIST`` under ``root`` (downloading when online and the
    files are missing).
    """
    from torchvision.datasets import MNIST

    raw = Path(root) / "MNIST" / "raw"
    fix = (
        f"put the four uncompressed IDX files ({', '.join(MNIST_FILES)}) there, or set"
        " MNIST_ROOT to the folder that holds MNIST/raw"
    )
    check_mnist_files(root)
    try:
        dataset = MNIST(root, train=train, download=download)
    # torchvision raises RuntimeError or URLError when offline or the files are bad
    except Exception as error:
        detail = (str(error).splitlines() or [""])[0]
        raise ConfigError(
            f"cannot load MNIST from {raw} ({type(error).__name__}"
            f"{': ' + detail if detail else ''}); {fix}"
        ) from None
    images, labels = dataset.data, dataset.targets
    count = 60000 if train else 10000
    if (
        images.dtype != torch.uint8
        or tuple(images.shape) != (count, 28, 28)
        or tuple(labels.shape) != (count,)
        or not 0 <= int(labels.min()) <= int(labels.max()) <= 9
    ):
        raise ConfigError(
            f"MNIST from {raw} holds images {tuple(images.shape)} and labels"
            f" {tuple(labels.shape)}, expected ({count}, 28, 28) uint8 and ({count},)"
            f" from 0 to 9; {fix}"
        )
    return images, labels


def normalize(images, mean=0.1307, std=0.3081):
    """uint8 images (N, 28, 28) → float vectors (N, 784): ``(x / 255 - mean) / std``."""
    return (images.reshape(len(images), PIXELS).float() / 255 - mean) / std


def denormalize(x, mean=0.1307, std=0.3081):
    """Normalized vectors → images in [0, 1] of shape (N, 1, 28, 28), clipped for
    display."""
    return (x.detach().float().cpu() * std + mean).clamp(0, 1).reshape(-1, 1, 28, 28)


def mnist_splits(config, device=None):
    """Training, validation and test sets as ``{"train": (x, y), "validation": (x, y),
    "test": (x, y)}``.

    Each ``x`` is one normalized float tensor (N, 784) on ``device``; training batches
    index into it, so there is no per-image transform in the training loop. The
    validation images are ``validation_size`` training images chosen with
    ``validation_seed``; the 10,000 test images are never used for training or model
    selection.
    """
    device = device or select_device(config["device"])
    mean, std = config["normalize_mean"], config["normalize_std"]
    images, labels = load_mnist(config["data_root"], train=True)
    order = torch.randperm(
        len(images), generator=torch.Generator().manual_seed(config["validation_seed"])
    )
    validation, train = (
        order[: config["validation_size"]],
        order[config["validation_size"] :],
    )
    test_images, test_labels = load_mnist(config["data_root"], train=False)
    splits = {
        "train": (
            normalize(images[train], mean, std).to(device),
            labels[train].to(device),
        ),
        "validation": (
            normalize(images[validation], mean, std).to(device),
            labels[validation].to(device),
        ),
        "test": (normalize(test_images, mean, std).to(device), test_labels.to(device)),
    }
    if config.get("binarize", "none") != "none":  # one fixed draw (chapter 7)
        generator = torch.Generator().manual_seed(BINARIZATION_SEED)
        fixed = ["test", "validation"] + (["train"] * (config["binarize"] == "fixed"))
        for split in fixed:
            splits[split] = (binarize(splits[split][0], generator), splits[split][1])
    return splits


BINARIZATION_SEED = 0  # the one fixed draw of the binarized test and validation images


def binarize(images, generator):
    """Stochastic binarization: each pixel becomes 1 with probability its intensity in
    [0, 1], else 0; drawn on the CPU with ``generator``, returned on ``images``' device.
    """
    return torch.bernoulli(images.cpu(), generator=generator).to(images.device)


# --------------------------------------------------------------------------------------
# Model and loss
# --------------------------------------------------------------------------------------


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(sizes, activation="relu"):
    """Linear layers with ReLU (or tanh) between them and a linear last layer."""
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers[:-1])


class VAE(nn.Module):
    """An MLP VAE: encoder 784 → hidden → (μ, log σ²), decoder latent → hidden reversed
    → 784.

    The decoder's output layer is linear: normalized pixels range from -0.42 to 2.82,
    which a sigmoid, tanh or ReLU head would clip.
    """

    def __init__(
        self,
        latent_dim=32,
        hidden_sizes=(100, 100),
        activation="relu",
        likelihood="gaussian",
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.likelihood = likelihood  # "bernoulli": the decoder outputs pixel logits
        self.encoder = mlp([PIXELS, *hidden_sizes, 2 * latent_dim], activation)
        self.decoder = mlp([latent_dim, *reversed(hidden_sizes), PIXELS], activation)

    def encode(self, x):
        """The posterior q(z|x) = N(μ, diag σ²) as its mean and log-variance, each (N,
        latent_dim)."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):
        """The decoder's mean image (N × 784) for latent codes z: normalized units, or
        pixel probabilities (the sigmoid of the logits) for the Bernoulli decoder."""
        output = self.decoder(z)
        return torch.sigmoid(output) if self.likelihood == "bernoulli" else output

    def forward(self, x, generator=None):
        """Encode, sample z = μ + σ·ε with the reparameterization trick, decode; return
        (x̂, μ, log σ²), x̂ being the pixel logits for the Bernoulli decoder."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator)
        return self.decoder(z), mu, logvar


def model_from_config(config):
    """A fresh VAE with the config's sizes."""
    return VAE(
        config["latent_dim"],
        config["hidden_sizes"],
        config.get("activation", "relu"),
        config.get("likelihood", "gaussian"),
    )


def reparameterize(mu, logvar, generator=None):
    """A differentiable sample z = μ + exp(log σ² / 2) · ε with ε ~ N(0, I)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu, logvar):
    """Closed-form KL(N(μ, diag σ²) ‖ N(0, I)) per image, summed over the latent
    dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(dim=-1)


def kl_divergence_parts(mu, logvar):
    """The closed-form KL per image split in two parts that sum to ``kl_divergence``.

    The σ-part ½Σ(σ² − 1 − log σ²) grows as the posterior gets narrower than the prior
    (its precision); the μ-part ½Σμ² grows as its mean moves away from 0. Returns
    ``(sigma_part, mu_part)``, each (N,) in nats.
    """
    sigma_part = 0.5 * (logvar.exp() - 1 - logvar).sum(dim=-1)
    mu_part = 0.5 * mu.pow(2).sum(dim=-1)
    return sigma_part, mu_part


def bits_per_dimension(log_likelihood, std=0.3081):
    """Bits per pixel of 8-bit MNIST for a log-density in nats per image of normalized
    pixels (a density on x = (g/255 − mean)/std, with g the gray level in [0, 256)).

    The change of variables to gray levels adds −784·log(255·std) nats; dividing the
    negative log-likelihood by 784·log 2 gives bits per pixel (8 for a uniform model).
    """
    nats = log_likelihood - PIXELS * math.log(255 * std)
    return -nats / (PIXELS * math.log(2))


def bernoulli_log_likelihood(logits, x):
    """log p(x|z) in nats per image of binary pixels x under independent Bernoulli
    pixels with probabilities sigmoid(logits): Σ x log p + (1 − x) log(1 − p), computed
    from the logits so that no log(0) occurs."""
    return -nn.functional.binary_cross_entropy_with_logits(
        logits, x, reduction="none"
    ).sum(dim=-1)


def reconstruction_error(reconstruction, x, likelihood="gaussian"):
    """Per image: the SSE over pixels (Gaussian decoder) or −log p(x|z) in nats
    (Bernoulli decoder, ``reconstruction`` holding its logits)."""
    if likelihood == "bernoulli":
        return -bernoulli_log_likelihood(reconstruction, x)
    return (reconstruction - x).pow(2).sum(dim=-1)


def vae_loss(reconstruction, x, mu, logvar, beta, free_bits=0.0, likelihood="gaussian"):
    """The training loss J_β(x) = SSE(x) + β · KL(q(z|x) ‖ N(0, I)) per image (SSE over
    784 pixels, KL summed over the latents), averaged over the batch; for the Bernoulli
    decoder, −log p(x|z) in nats replaces the SSE.

    Returns ``(total, reconstruction_error, kl)``, each a batch mean. Summing over
    pixels and latents first keeps β's meaning: a per-element mean would divide the SSE
    by 784 and the KL by the latent size. With ``free_bits`` λ > 0 the total uses
    ``free_bits_kl`` instead of the KL (the returned ``kl`` stays the plain KL).
    """
    error = reconstruction_error(reconstruction, x, likelihood)
    kl = kl_divergence(mu, logvar)
    if free_bits > 0:
        total = error.mean() + beta * free_bits_kl(mu, logvar, free_bits)
        return total, error.mean(), kl.mean()
    return (error + beta * kl).mean(), error.mean(), kl.mean()


def free_bits_kl(mu, logvar, floor):
    """The KL term with free bits (Kingma et al., 2016): Σ_d max(λ, KL_d), where KL_d is
    dimension d's KL averaged over the batch and λ = ``floor`` nats.

    Below λ a dimension's KL costs nothing and has no gradient, so the optimizer has no
    reason to push it down to 0 (to collapse it). With λ = 0 it is the batch mean of
    ``kl_divergence``.
    """
    per_dimension = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(dim=0)
    return per_dimension.clamp(min=floor).sum()


def kl_weight(beta, progress, warmup_epochs):
    """The KL weight under KL annealing (Bowman et al., 2016): it rises linearly from 0
    to β over the first ``warmup_epochs`` epochs, then stays at β.

    ``progress`` is the number of epochs done, fractions included (1.5: halfway through
    the second epoch). With ``warmup_epochs`` = 0 it is β throughout.
    """
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, progress / warmup_epochs)


def gaussian_elbo_nats(total_loss, beta):
    """The ELBO ℒ(x) per image in nats (normalized pixel units) of a Gaussian decoder
    with variance σ² = β / 2, from the training loss J_β (``total_loss``).

    With σ² = β/2, log p(x|z) = -SSE/β - (784/2)·log(πβ), so ℒ = -(SSE + β·KL)/β -
    392·log(πβ) = -J_β/β - 392·log(πβ).
    """
    return -total_loss / beta - PIXELS / 2 * math.log(math.pi * beta)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def adam(parameters, learning_rate, eps=1e-8):
    """``torch.optim.Adam`` with its fused kernel (one kernel for all parameters;
    measured in benchmarks/benchmark_adam.py), falling back to the default
    implementation where this torch or device has no fused Adam.

    The fused and the default update agree to float rounding (tests/test_training.py).
    """
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=learning_rate, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(parameters, lr=learning_rate, eps=eps)


def train_epoch(
    model,
    optimizer,
    images,
    batch_size,
    beta,
    generator,
    epoch=1,
    kl_warmup_epochs=0,
    free_bits=0.0,
):
    """One pass over ``images`` in shuffled batches; returns the epoch's mean loss J_β,
    reconstruction error and KL as a dict with the keys "loss", "reconstruction" and
    "kl".

    Batches are index lookups into the one data tensor. Stops with ``TrainingDiverged``
    naming the epoch and batch when the loss turns NaN or infinite. ``kl_warmup_epochs``
    (KL annealing, see ``kl_weight``) and ``free_bits`` (see ``free_bits_kl``) change
    the loss optimized; with their defaults it is SSE + β·KL.
    """
    model.train()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    # the loss, the reconstruction error and the KL, each summed over images
    sums = torch.zeros(3, device=images.device)
    batches = math.ceil(len(images) / batch_size)
    for batch, start in enumerate(range(0, len(images), batch_size), start=1):
        x = images[order[start : start + batch_size]]
        reconstruction, mu, logvar = model(x)
        weight = kl_weight(beta, epoch - 1 + batch / batches, kl_warmup_epochs)
        loss, reconstruction_error, kl = vae_loss(
            reconstruction,
            x,
            mu,
            logvar,
            weight,
            free_bits,
            likelihood=model.likelihood,
        )
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at epoch {epoch}, batch {batch}; "
                "lower learning_rate or check the data's normalization"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack(
            [loss.detach(), reconstruction_error.detach(), kl.detach()]
        ) * len(x)
    loss, reconstruction_error, kl = (sums / len(images)).tolist()
    return {"loss": loss, "reconstruction": reconstruction_error, "kl": kl}


@torch.no_grad()
def evaluate(model, images, beta, batch_size=1000, seed=0):
    """The loss J_β and its two parts (SSE, KL), averaged over ``images``; z is sampled
    with a fixed seed, so it repeats."""
    model.eval()
    generator = torch.Generator(images.device).manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        mu, logvar = model.encode(x)
        reconstruction = model.decoder(reparameterize(mu, logvar, generator))
        parts = vae_loss(
            reconstruction, x, mu, logvar, beta, likelihood=model.likelihood
        )
        sums += torch.tensor([p.item() for p in parts], dtype=torch.float64) * len(x)
    loss, reconstruction_error, kl = (sums / len(images)).tolist()
    return {"loss": loss, "reconstruction": reconstruction_error, "kl": kl}


@torch.no_grad()
def reconstruct_as_uint8(model, x, config):
    """Decoder means for ``x`` (no sampling: z = μ) as uint8 images (N, 28, 28), for the
    progress animation."""
    model.eval()
    mean, std = config["normalize_mean"], config["normalize_std"]
    images = denormalize(model.decode(model.encode(x)[0]), mean, std)
    return (images * 255).round().to(torch.uint8).reshape(-1, 28, 28)


def save_checkpoint(path, checkpoint):
    """Write ``checkpoint`` with ``torch.save`` to a temporary file, then rename it over
    ``path``.

    The rename is atomic, so an interrupted or failed write (a kill, a full disk) leaves
    the previous checkpoint intact. The temporary file has a name of its own (two runs
    never share one), is flushed to the disk before the rename, and is removed if the
    write fails; the error (an ``OSError`` with its errno) is raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(temporary, "xb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path, fix="delete it to train again"):
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain Python values
    only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint '{path}' not found") from None
    except OSError as error:
        raise ConfigError(
            f"cannot read checkpoint '{path}' ({error.strerror}); {fix}"
        ) from None
    except Exception as error:
        raise ConfigError(
            f"checkpoint '{path}' is unreadable ({type(error).__name__}): it is not a"
            f" checkpoint of this code, or it is damaged; {fix}"
        ) from None


CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "config",
    "history",
    "epoch",
    "shuffle_rng",
    "torch_rng",
)
HISTORY_KEYS = ("epoch", "train_loss", "validation_loss", "frames")


def check_checkpoint(checkpoint, config, path, fix="delete it to train again"):
    """Raise ``ConfigError`` (one line: the first problem, then ``fix``) unless
    ``checkpoint`` is a whole checkpoint of ``config`` as ``train`` writes it.

    Checked, in this order: the config it was trained with, its keys, the epoch, the
    history, each weight's name and shape, that the weights are finite, the optimizer
    state's shapes and the random states. So a foreign, damaged or diverged checkpoint
    is refused with the truth before it is used, not with a traceback or a NaN later.
    """

    def refuse(problem):
        raise ConfigError(f"checkpoint '{path}' {problem}; {fix}")

    if not isinstance(checkpoint, dict):
        refuse(f"holds a {type(checkpoint).__name__}, not a checkpoint of train()")
    if not isinstance(checkpoint.get("config"), dict):
        refuse("lacks 'config', the config it was trained with")
    check_same_config(checkpoint, config, path, fix)
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        refuse(f"lacks {', '.join(repr(key) for key in missing)}")
    epoch, history = checkpoint["epoch"], checkpoint["history"]
    if not _is_int(epoch) or not 1 <= epoch <= config["epochs"]:
        refuse(f"holds epoch {_short_repr(epoch)}, expected 1 to {config['epochs']}")
    if not isinstance(history, dict) or any(
        not isinstance(history.get(key), list) or len(history[key]) != epoch
        for key in HISTORY_KEYS
    ):
        refuse(f"holds a history without one entry for each of its {epoch} epochs")
    if not all(
        isinstance(frame, torch.Tensor) and frame.dim() == 3
        for frame in history["frames"]
    ):
        refuse("holds progress frames that are not images")
    with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
        model = model_from_config(config)
    parameters = dict(model.named_parameters())
    expected = {
        name: tuple(tensor.shape) for name, tensor in model.state_dict().items()
    }
    weights = checkpoint["model"]
    if not isinstance(weights, dict):
        refuse("holds no model weights")
    for name, shape in expected.items():
        if name not in weights:
            refuse(f"lacks the weights '{name}'")
        tensor = weights[name]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            refuse(
                f"holds '{name}' of shape {tuple(getattr(tensor, 'shape', ()))},"
                f" expected {shape}"
            )
        if not torch.isfinite(tensor).all():
            refuse(f"holds NaN or infinite weights ('{name}'): its run diverged")
    unexpected = sorted(set(weights) - set(expected), key=str)
    if unexpected:
        refuse(f"holds weights this model does not have ('{unexpected[0]}')")
    try:
        state = checkpoint["optimizer"]["state"]
        groups = checkpoint["optimizer"]["param_groups"]
        indices = [index for group in groups for index in group["params"]]
        fits = len(indices) == len(parameters) and all(
            not isinstance(value, torch.Tensor)
            or value.dim() == 0
            or (tuple(value.shape) == tuple(p.shape) and torch.isfinite(value).all())
            for index, p in zip(indices, parameters.values())
            for value in state.get(index, {}).values()
        )
    except (KeyError, TypeError, AttributeError):
        fits = False
    if not fits:
        refuse("holds an optimizer state that does not fit the model")
    for key in ("shuffle_rng", "torch_rng"):
        try:
            torch.Generator().set_state(checkpoint[key])
        except (RuntimeError, TypeError):
            refuse(f"holds an invalid random state '{key}'")


def checkpoint_path(config):
    """Where the model of ``config`` is saved: one file per config key, so configs never
    share a checkpoint."""
    return Path(config["output_dir"]) / f"vae-{config_key(config)}.pt"


PROGRESS_IMAGES = (
    32  # validation images reconstructed after every epoch for the progress animation
)


def train(config, data=None, resume=False, progress=True):
    """Train the VAE of ``config``, checkpointing after every epoch; return ``(model,
    history)``.

    The history holds, per epoch, the training loss and the validation loss,
    reconstruction error and KL, and ``frames``: the first ``PROGRESS_IMAGES``
    validation images reconstructed after each epoch (uint8). With ``resume=True``
    training continues from the config's checkpoint, with the same random state, so an
    interrupted run ends exactly where an uninterrupted one would.
    """
    device = select_device(config["device"])
    data = data or mnist_splits(config, device)
    train_images, validation_images = (
        data["train"][0].to(device),
        data["validation"][0].to(device),
    )
    torch.manual_seed(config["seed"])
    model = model_from_config(config).to(device)
    optimizer = adam(
        model.parameters(), config["learning_rate"], eps=config["adam_epsilon"]
    )
    shuffle = torch.Generator().manual_seed(config["seed"])
    history = {
        "epoch": [],
        "train_loss": [],
        "train_reconstruction": [],
        "train_kl": [],
        "validation_loss": [],
        "validation_reconstruction": [],
        "validation_kl": [],
        "seconds": [],
        "frames": [],
    }
    path = checkpoint_path(config)
    if resume and path.exists():
        checkpoint = load_checkpoint(path)
        check_checkpoint(checkpoint, config, path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history = checkpoint["history"]
        shuffle.set_state(checkpoint["shuffle_rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
    start = len(history["epoch"]) + 1
    bar = tqdm(
        range(start, config["epochs"] + 1),
        initial=start - 1,
        total=config["epochs"],
        unit="epoch",
        desc=f"β={config['beta']:.3g}",
        disable=not progress,
    )
    for epoch in bar:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(config, epoch)
        train_parts = train_epoch(
            model,
            optimizer,
            binarize(train_images, shuffle)
            if config["binarize"] == "dynamic"  # a fresh draw every epoch
            else train_images,
            config["batch_size"],
            config["beta"],
            shuffle,
            epoch=epoch,
            kl_warmup_epochs=config["kl_warmup_epochs"],
            free_bits=config["free_bits"],
        )
        validation = evaluate(model, validation_images, config["beta"])
        for key, value in [
            ("epoch", epoch),
            ("train_loss", train_parts["loss"]),
            ("train_reconstruction", train_parts["reconstruction"]),
            ("train_kl", train_parts["kl"]),
            ("validation_loss", validation["loss"]),
            ("validation_reconstruction", validation["reconstruction"]),
            ("validation_kl", validation["kl"]),
            ("seconds", time.perf_counter() - began),
        ]:
            history[key].append(value)
        history["frames"].append(
            reconstruct_as_uint8(
                model, validation_images[:PROGRESS_IMAGES], config
            ).cpu()
        )
        bar.set_postfix(
            train=f"{train_parts['loss']:.2f}", validation=f"{validation['loss']:.2f}"
        )
        save_checkpoint(
            path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "config": config,
                "history": history,
                "epoch": epoch,
                "shuffle_rng": shuffle.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
        )
        if config["schedule"] == "burda" and epoch < config["epochs"]:
            save_stage_checkpoint(config, epoch)
    return model, history


def copy_checkpoint(source_config, target_config):
    """Save the checkpoint of ``source_config`` as the checkpoint of ``target_config``,
    the same run with another number of epochs.

    A run with fewer epochs is exactly the start of a longer one (same seed, batches and
    learning rates), so ``load_or_train(target_config)`` then finds a shorter run
    finished and continues a longer one from here, instead of training from scratch.
    """
    checkpoint = load_checkpoint(checkpoint_path(source_config))
    save_checkpoint(
        checkpoint_path(target_config), {**checkpoint, "config": target_config}
    )


def save_stage_checkpoint(config, epoch):
    """At the end of a stage of Burda et al.'s schedule, keep the model of ``config``
    after ``epoch`` epochs as the finished model of ``{**config, "epochs": epoch}``."""
    if burda_stage(epoch + 1) > burda_stage(epoch):
        copy_checkpoint(config, {**config, "epochs": epoch})


def burda_stage(epoch):
    """The stage i of Burda et al.'s schedule that epoch ``epoch`` (from 1) is in:
    stage i lasts 3^i epochs, so it ends after epoch (3^(i+1) − 1) / 2 (1, 4, 13, 40,
    121, …)."""
    stage = 0
    while (3 ** (stage + 1) - 1) // 2 < epoch:
        stage += 1
    return stage


def learning_rate_at(config, epoch):
    """The learning rate of epoch ``epoch`` (from 1): ``learning_rate`` throughout, or
    with ``schedule: burda`` learning_rate · 10^(−i/7) in stage i (Burda et al., 2016).
    """
    if config["schedule"] == "burda":
        return config["learning_rate"] * 10 ** (-burda_stage(epoch) / 7)
    return config["learning_rate"]


def check_same_config(checkpoint, config, path, fix="delete it or change output_dir"):
    """Refuse a checkpoint trained with another config (paths and device aside)."""
    trained_with = checkpoint["config"]
    try:
        same = config_key(trained_with) == config_key(config)
    except (TypeError, ValueError):  # not a config of this code
        same = False
    if not same:
        differ = sorted(
            str(k)
            for k in set(config) | set(trained_with)
            if k not in LOCATION_KEYS and trained_with.get(k) != config.get(k)
        )
        raise ConfigError(
            f"checkpoint '{path}' was trained with a different config (differs in: "
            f"{', '.join(differ) or 'types of values'}); {fix}"
        )


def load_or_train(config, data=None, progress=True):
    """The trained model of ``config`` and its history: loaded from its checkpoint when
    training finished, resumed when it was interrupted, trained from scratch when there
    is none."""
    path = checkpoint_path(config)
    if path.exists():
        checkpoint = load_checkpoint(path)
        check_checkpoint(checkpoint, config, path)
        if checkpoint["epoch"] >= config["epochs"]:
            model = model_from_config(config)
            model.load_state_dict(checkpoint["model"])
            return (
                model.to(select_device(config["device"])).eval(),
                checkpoint["history"],
            )
    model, history = train(config, data, resume=True, progress=progress)
    return model.eval(), history


# --------------------------------------------------------------------------------------
# Display
# --------------------------------------------------------------------------------------


def image_grid(x, config=None, nrow=8):
    """Normalized vectors (N, 784) → one de-normalized grid image (H, W) in [0, 1] for
    ``plt.imshow``."""
    from torchvision.utils import make_grid

    mean, std = (
        (config["normalize_mean"], config["normalize_std"])
        if config
        else (0.1307, 0.3081)
    )
    return make_grid(denormalize(x, mean, std), nrow=nrow, padding=2, pad_value=1.0)[0]


@torch.no_grad()
def sample_prior(model, n, seed=0):
    """Decode ``n`` latent codes drawn from the prior N(0, I) with a fixed seed."""
    model.eval()
    device = next(model.parameters()).device
    z = torch.randn(
        n, model.latent_dim, generator=torch.Generator().manual_seed(seed)
    ).to(device)
    return model.decode(z)


def progress_gif(frames, nrow=8, scale=2, milliseconds=300):
    """The validation-progress animation as GIF bytes: one grid of reconstructions per
    epoch, labelled."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    pictures = []
    for epoch, frame in enumerate(frames, start=1):
        grid = make_grid(frame.unsqueeze(1), nrow=nrow, padding=2, pad_value=255)[
            0
        ].numpy()
        picture = Image.fromarray(grid).resize(
            (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST
        )
        canvas = Image.new("L", (picture.width, picture.height + 16), 255)
        canvas.paste(picture, (0, 16))
        ImageDraw.Draw(canvas).text((4, 2), f"epoch {epoch}/{len(frames)}", fill=0)
        pictures.append(canvas)
    buffer = io.BytesIO()
    pictures[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=pictures[1:],
        duration=milliseconds,
        loop=0,
    )
    return buffer.getvalue()


@torch.no_grad()
def latent_means(model, images, batch_size=1000):
    """The posterior means μ(x) for ``images``, as one (N, latent_dim) tensor on the
    CPU."""
    return posterior_parameters(model, images, batch_size)[0]


def gif_html(gif_bytes, width=None):
    """An ``IPython.display.HTML`` image of GIF bytes, shown inline in JupyterLab, Colab
    and the book."""
    import base64
    from IPython.display import HTML

    size = f' width="{width}"' if width else ""
    return HTML(
        f'<img src="data:image/gif;base64,{base64.b64encode(gif_bytes).decode()}"{size}'
        ' alt="Validation reconstructions after each epoch"/>'
    )


def glue(name, value, display=True):
    """Show ``value`` and, where myst-nb is installed (the book build), register it as
    ``name`` so that other pages of the book can paste it; on Colab without myst-nb it
    is only shown."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            from IPython.display import display as show

            show(value)
        return
    myst_glue(name, value, display=display)


# --------------------------------------------------------------------------------------
# The latent explorer (notebooks/08_latent_explorer.ipynb)
# --------------------------------------------------------------------------------------

EXPLORER_PREFIX = "window.LATENT_EXPLORER = "


def _base64(tensor, dtype):
    """A tensor's values as base64 of little-endian ``dtype`` bytes (what JavaScript's
    typed arrays read)."""
    import base64

    array = tensor.detach().cpu().contiguous().numpy().astype(dtype)
    return base64.b64encode(array.tobytes()).decode()


def export_explorer_weights(config, config_2d, path, data=None, directions=8):
    """Write the weights of the models of ``config`` (32-D) and ``config_2d`` (2-D),
    with the test codes, as one script ``window.LATENT_EXPLORER = {...}`` for the
    browser.

    The models are the chapters' checkpoints (trained first if missing). The page also
    gets the 2-D codes of the test digits (the map), the principal directions of the
    32-D codes (the sliders) and the first three test images of each digit (uint8).
    Float32 arrays are base64 strings. A plain script, not a fetched file, so that the
    page also works opened from disk. Returns the file's size in bytes.
    """
    data = data or mnist_splits(config, device="cpu")
    images, labels = (tensor.cpu() for tensor in data["test"])
    export, codes = (
        {"normalize": [config["normalize_mean"], config["normalize_std"]]},
        {},
    )
    for name, model_config in [("latent32", config), ("latent2", config_2d)]:
        model = load_or_train(model_config, data, progress=False)[0].cpu()
        tensors = {
            key: {"shape": list(value.shape), "data": _base64(value, "<f4")}
            for key, value in model.state_dict().items()
        }
        export[name] = {"config_key": config_key(model_config), "tensors": tensors}
        codes[name] = latent_means(model, images)
    mean = codes["latent32"].mean(dim=0)
    _, singular, rows = torch.linalg.svd(codes["latent32"] - mean, full_matrices=False)
    variance = singular**2 / (len(images) - 1)
    export["principal"] = {
        "mean": _base64(mean, "<f4"),
        "directions": _base64(rows[:directions], "<f4"),
        "std": variance[:directions].sqrt().tolist(),
        "explained": (variance[:directions] / variance.sum()).tolist(),
    }
    export["map"] = {
        "codes": _base64(codes["latent2"], "<f4"),
        "labels": _base64(labels, "u1"),
    }
    first = [int(i) for d in range(10) for i in (labels == d).nonzero()[:3, 0]]
    pixels = denormalize(images[first], *export["normalize"]) * 255
    export["digits"] = {
        "index": first,
        "labels": labels[first].tolist(),
        "images": _base64(pixels.round(), "u1"),
    }
    text = EXPLORER_PREFIX + json.dumps(export) + ";\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return len(text)


def read_explorer_weights(path):
    """The model weights in a file written by ``export_explorer_weights``, as
    ``{"latent32": state_dict, "latent2": state_dict}`` of float32 tensors."""
    import base64

    text = Path(path).read_text()
    export = json.loads(text.removeprefix(EXPLORER_PREFIX).rstrip().rstrip(";"))
    return {
        name: {
            key: torch.frombuffer(
                bytearray(base64.b64decode(tensor["data"])), dtype=torch.float32
            ).reshape(tensor["shape"])
            for key, tensor in export[name]["tensors"].items()
        }
        for name in ("latent32", "latent2")
    }


# --------------------------------------------------------------------------------------
# Evaluation metrics (chapter 5)
# --------------------------------------------------------------------------------------


@torch.no_grad()
def posterior_parameters(model, images, batch_size=1000):
    """The posterior means μ(x) and log-variances log σ²(x) for ``images``, each (N,
    latent_dim) on the CPU."""
    model.eval()
    parts = [
        model.encode(images[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat([mu.cpu() for mu, _ in parts]), torch.cat(
        [logvar.cpu() for _, logvar in parts]
    )


def active_units(model, images, threshold=0.01):
    """The number of active latent dimensions and the variance of each: dimension d is
    active when Cov_x(E_q[z_d]), the variance over ``images`` of the posterior mean
    μ_d(x), exceeds ``threshold`` (Burda et al., 2016). Returns ``(count, variances)``.
    """
    variances = latent_means(model, images).var(dim=0)
    return int((variances > threshold).sum()), variances


def kl_per_dimension(model, images):
    """KL(q(z_d|x) ‖ N(0, 1)) in nats for each latent dimension d, averaged over
    ``images``; sums to the KL."""
    mu, logvar = posterior_parameters(model, images)
    return kl_divergence(mu.unsqueeze(-1), logvar.unsqueeze(-1)).mean(
        dim=0
    )  # a trailing axis of one dimension


@torch.no_grad()
def importance_weighted_log_likelihood(
    model, images, beta, k=100, seed=0, max_decodes=10000
):
    """The importance-weighted bound ℒ_K (Burda et al., 2016) on log p(x) per image, in
    nats (normalized pixel units): one estimate per image.

    For each image, log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x) with z_k ~ q(z|x), under
    the Gaussian decoder N(x̂(z), σ² I) with σ² = β / 2, as in ``gaussian_elbo_nats``.
    With K = 1 it is an unbiased estimate of the ELBO ℒ; its expectation ℒ_K grows with
    K towards log p(x). Returns a float64 tensor (N,); images are processed in chunks of
    ``max_decodes // k`` images, z is drawn with a fixed seed.
    """
    model.eval()
    variance = beta / 2
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, max_decodes // k)
    estimates = []
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk]
        mu, logvar = model.encode(x)
        eps = torch.randn((k, *mu.shape), generator=generator).to(mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps  # (K, n, latent_dim)
        if model.likelihood == "bernoulli":  # binary x; β plays no part
            logits = model.decoder(z)
            log_p_x_given_z = bernoulli_log_likelihood(logits, x.expand_as(logits))
            log_p_x_given_z = log_p_x_given_z.double()
        else:
            squared_error = (model.decode(z) - x).double().pow(2).sum(dim=-1)
            log_p_x_given_z = -squared_error / (2 * variance) - PIXELS / 2 * math.log(
                2 * math.pi * variance
            )
        log_p_z = -0.5 * z.double().pow(2).sum(
            dim=-1
        )  # the constants -d/2·log 2π of p(z) and q(z|x) cancel
        log_q_z = -0.5 * (eps.double().pow(2) + logvar.double()).sum(dim=-1)
        log_weights = log_p_x_given_z + log_p_z - log_q_z
        estimates.append((torch.logsumexp(log_weights, dim=0) - math.log(k)).cpu())
    return torch.cat(estimates)


def frechet_distance(features_a, features_b):
    """The Fréchet distance between Gaussians fitted to two sets of feature rows (Heusel
    et al., 2017): ‖m_a − m_b‖² + tr(C_a + C_b − 2 (C_a C_b)^½).

    tr (C_a C_b)^½ is computed as tr (A C_b A)^½ with A = C_a^½ (same eigenvalues), from
    symmetric eigendecompositions.
    """
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    trace_root = (
        torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    )
    distance = (
        (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    )
    return max(distance.item(), 0.0)


def aggregate_posterior_moments(means, variances=None):
    """The mean m and covariance S of the rows of ``means`` (float64).

    With ``variances`` (the encoder's σ²(x), same shape), their average is added to the
    diagonal of S (the law of total covariance): then m and S are the mean and
    covariance of the aggregate posterior q(z) = E_x q(z|x).
    """
    m, covariance = (
        means.double().mean(0),
        torch.cov(means.double().T).reshape(means.shape[1], -1),
    )
    if variances is not None:
        covariance = covariance + torch.diag(variances.double().mean(0))
    return m, covariance


def gaussian_fit_kl_to_prior(means, variances=None):
    """KL(N(m, S) ‖ N(0, I)) in nats, with m and S from
    ``aggregate_posterior_moments(means, variances)``."""
    m, covariance = aggregate_posterior_moments(means, variances)
    return 0.5 * (covariance.trace() + m @ m - len(m) - torch.logdet(covariance)).item()


class MNISTClassifier(nn.Module):
    """The reference classifier that scores generated digits: an MLP 784 → 256 → 256 →
    10 on normalized images.

    ``features`` (the penultimate layer, after its ReLU) are the features of the Fréchet
    distance.
    """

    def __init__(self, hidden_sizes=(256, 256)):
        super().__init__()
        self.features = nn.Sequential(mlp([PIXELS, *hidden_sizes]), nn.ReLU())
        self.head = nn.Linear(hidden_sizes[-1], 10)

    def forward(self, x):
        """Class logits (N, 10)."""
        return self.head(self.features(x))


# How the reference classifier is trained: Adam with the learning rate decayed linearly
# to 0, on the training split.
CLASSIFIER_SETTINGS = {
    "hidden_sizes": [256, 256],
    "epochs": 6,
    "batch_size": 128,
    "learning_rate": 1.0e-3,
    "seed": 0,
}


def classifier_path(config, settings=CLASSIFIER_SETTINGS):
    """Where the reference classifier is cached: keyed by its settings and the config's
    data keys."""
    keys = ("normalize_mean", "normalize_std", "validation_size", "validation_seed")
    identity = {"settings": settings, "data": {k: config[k] for k in keys}}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return Path(config["output_dir"]) / f"classifier-{key}.pt"


def load_or_train_classifier(config, data=None, settings=CLASSIFIER_SETTINGS):
    """The reference MNIST classifier (eval mode, CPU): loaded from ``output_dir`` when
    cached, else trained on the training split with a fixed seed (about 10 s on a 2-core
    CPU) and saved with ``save_checkpoint``."""
    path = classifier_path(config, settings)
    if path.exists():
        classifier = MNISTClassifier(settings["hidden_sizes"])
        classifier.load_state_dict(load_checkpoint(path)["model"])
        return classifier.eval()
    images, labels = (data or mnist_splits(config, "cpu"))["train"]
    images, labels = images.cpu(), labels.cpu()
    torch.manual_seed(settings["seed"])
    classifier = MNISTClassifier(settings["hidden_sizes"])
    optimizer = torch.optim.Adam(classifier.parameters(), lr=settings["learning_rate"])
    shuffle = torch.Generator().manual_seed(settings["seed"])
    batch_size, step = settings["batch_size"], 0
    steps = settings["epochs"] * math.ceil(len(images) / batch_size)
    classifier.train()
    for _ in range(settings["epochs"]):
        order = torch.randperm(len(images), generator=shuffle)
        for start in range(0, len(images), batch_size):
            for group in optimizer.param_groups:
                group["lr"] = settings["learning_rate"] * (1 - step / steps)
            batch = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(classifier(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    save_checkpoint(path, {"model": classifier.state_dict(), "settings": settings})
    return classifier.eval()


@torch.no_grad()
def classifier_outputs(classifier, images, batch_size=2000):
    """The classifier's penultimate-layer features (N, 256) and class probabilities (N,
    10), on the CPU."""
    classifier.eval()
    features = torch.cat(
        [
            classifier.features(images[i : i + batch_size].cpu())
            for i in range(0, len(images), batch_size)
        ]
    )
    return features, torch.softmax(classifier.head(features), dim=-1)


def class_histogram_entropy(probabilities):
    """The entropy in nats of the histogram of predicted classes: ln 10 ≈ 2.303 when all
    ten digits are equally frequent, 0 when every image is called the same digit."""
    frequencies = torch.bincount(
        probabilities.argmax(dim=-1), minlength=probabilities.shape[-1]
    ).double()
    frequencies = frequencies[frequencies > 0] / frequencies.sum()
    return -(frequencies * frequencies.log()).sum().item()
