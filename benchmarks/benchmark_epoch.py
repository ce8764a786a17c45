"""Seconds per training epoch of the book's VAE on the CPU: the project's loop, the usual DataLoader idiom, a floor.

Usage: ``MNIST_ROOT=... python benchmarks/benchmark_epoch.py [-c config.yaml] [--epochs N]``. It reports; it asserts
nothing. Timings use ``time.perf_counter`` and torch's default thread count (printed), on the 55,000 training images.

1. Project loop: ``vh.train_epoch`` on the one normalized tensor from ``vh.mnist_splits`` (batches are index
   lookups), with the config's model and ``torch.optim.Adam``: one warm-up epoch, then the median of ``--epochs``.
2. DataLoader idiom, as in pytorch/examples' VAE: ``torchvision.datasets.MNIST`` with ``ToTensor`` + ``Normalize``,
   a ``Subset`` with the same training indices as ``vh.mnist_splits``, ``DataLoader(shuffle=True)``, the same model,
   optimizer and loss (``vh.vae_loss``), and ``loss.item()`` per batch. A partial warm-up (20 batches), then the median
   of ``--loader-epochs``, for num_workers=0 (pytorch/examples' CPU setting: the speedup is measured against it) and
   num_workers=2 (reported for context).
3. Floor: the FLOPs of one epoch's GEMMs (2·m·k·n each: every Linear's forward, its weight gradient, and its input
   gradient except for the first layer, whose input needs none) over all training images, from the model's actual
   layer shapes, divided by the rate of a 2048³ ``torch.matmul`` measured here (median of 10). For context it also
   times the model's own GEMM shapes at the config's batch size (all forward and backward shapes, in a loop): the time
   the GEMMs alone would take at that batch size.
Work sharing the CPU slows every number, and the parts run one after another, so run it more than once. The load
average (printed at the start and the end) shows only this machine's own load, not a virtual machine's neighbours.
"""
import argparse
import os
import statistics
import time

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

import vae_helpers as vh


def seconds(function, repeats):
    """The median wall time of ``repeats`` calls of ``function``."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def fresh_model(config):
    torch.manual_seed(config["seed"])
    model = vh.model_from_config(config)
    return model, torch.optim.Adam(model.parameters(), lr=config["learning_rate"])


def project_epoch_seconds(config, train_images, epochs):
    model, optimizer = fresh_model(config)
    shuffle = torch.Generator().manual_seed(config["seed"])
    epoch = lambda: vh.train_epoch(model, optimizer, train_images, config["batch_size"], config["beta"], shuffle)
    epoch()  # warm-up
    return seconds(epoch, epochs)


def dataloader_epoch_seconds(config, dataset, num_workers, epochs):
    model, optimizer = fresh_model(config)
    loader = DataLoader(dataset, batch_size=config["batch_size"], shuffle=True, num_workers=num_workers)

    def epoch(max_batches=None):
        model.train()
        train_loss = 0.0
        for batch, (x, _) in enumerate(loader):
            if batch == max_batches:
                break
            x = x.view(len(x), -1)
            reconstruction, mu, logvar = model(x)
            loss = vh.vae_loss(reconstruction, x, mu, logvar, config["beta"])[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train_loss += loss.item()
        return train_loss

    epoch(max_batches=20)  # partial warm-up
    return seconds(epoch, epochs)


def step_gemms(model, batch):
    """The (A, B) operands of every GEMM in one training step on ``batch`` images, laid out as autograd uses them."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    gemms = []
    for layer in linears:
        weight = torch.randn(layer.out_features, layer.in_features)
        x, dy = torch.randn(batch, layer.in_features), torch.randn(batch, layer.out_features)
        gemms += [(x, weight.t()), (dy.t(), x)]  # forward x·Wᵀ; weight gradient dyᵀ·x
        if layer is not linears[0]:
            gemms.append((dy, weight))  # input gradient dy·W (none for the first layer: the data needs no gradient)
    return gemms


def flops(gemms):
    return sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in gemms)  # 2·m·k·n per GEMM


def gemm_rate(gemms, inner, repeats=10):
    """FLOP/s of running ``gemms`` ``inner`` times, median of ``repeats`` timings after a warm-up."""
    def run():
        for _ in range(inner):
            for a, b in gemms:
                torch.matmul(a, b)
    run()
    return flops(gemms) * inner / seconds(run, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config.yaml")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs of the project loop (median)")
    parser.add_argument("--loader-epochs", type=int, default=2, help="timed epochs of the DataLoader idiom (median)")
    args = parser.parse_args()
    began = time.perf_counter()
    config = vh.load_config(args.config)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {config['batch_size']}, "
          f"load average at start {os.getloadavg()[0]:.2f}")

    train_images = vh.mnist_splits(config, torch.device("cpu"))["train"][0]
    order = torch.randperm(vh.TRAINING_SET_SIZE, generator=torch.Generator().manual_seed(config["validation_seed"]))
    normalize = transforms.Normalize((config["normalize_mean"],), (config["normalize_std"],))
    mnist = torchvision.datasets.MNIST(config["data_root"], train=True,
                                       transform=transforms.Compose([transforms.ToTensor(), normalize]))
    dataset = Subset(mnist, order[config["validation_size"]:].tolist())
    assert len(dataset) == len(train_images) and torch.allclose(dataset[0][0].view(-1), train_images[0], atol=1e-5)

    project = project_epoch_seconds(config, train_images, args.epochs)
    loader = {w: dataloader_epoch_seconds(config, dataset, w, args.loader_epochs) for w in (0, 2)}

    model = vh.model_from_config(config)
    epoch_flops = flops(step_gemms(model, len(train_images)))
    square = torch.randn(2048, 2048)
    peak = gemm_rate([(square, square)], inner=1)
    shaped = gemm_rate(step_gemms(model, config["batch_size"]), inner=50)
    floor = epoch_flops / peak

    rows = [("project loop (vh.train_epoch)", project),
            ("DataLoader idiom, num_workers=0 (compared)", loader[0]),
            ("DataLoader idiom, num_workers=2", loader[2]),
            (f"floor: {epoch_flops / 1e9:.1f} GFLOP at 2048^3 rate {peak / 1e9:.0f} GFLOP/s", floor),
            (f"GEMMs alone at batch-{config['batch_size']} shapes, {shaped / 1e9:.0f} GFLOP/s", epoch_flops / shaped)]
    print(f"\n{'':56}s/epoch")
    for name, value in rows:
        print(f"{name:56}{value:7.3f}")
    speedup, over_floor = loader[0] / project, project / floor
    print(f"\nspeedup over the DataLoader idiom (num_workers=0): {speedup:5.1f}x  target >= 6x  "
          f"{'PASS' if speedup >= 6 else 'MISS'}   (vs num_workers=2: {loader[2] / project:.1f}x)")
    print(f"project loop / floor:                              {over_floor:5.1f}x  target <= 2x  "
          f"{'PASS' if over_floor <= 2 else 'MISS'}")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
