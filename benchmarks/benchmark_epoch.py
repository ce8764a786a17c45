"""Seconds per training epoch of the book's VAE on the CPU: the project's loop, the
usual DataLoader idiom, a floor.

Usage: ``MNIST_ROOT=... python benchmarks/benchmark_epoch.py [-c config.yaml] [--rounds
N]``. It reports; it asserts
nothing. Timings use ``time.perf_counter`` and torch's default thread count (printed),
on the 55,000 training images.

1. Project loop: ``vh.train_epoch`` on the one normalized tensor from
``vh.mnist_splits`` (batches are index
   lookups), with the config's model and the project's optimizer ``vh.adam`` (Adam's
   fused kernel where torch has it), after one warm-up epoch.
2. DataLoader idiom, as in pytorch/examples' VAE: ``torchvision.datasets.MNIST`` with
``ToTensor`` + ``Normalize``,
   a ``Subset`` with the same training indices as ``vh.mnist_splits``,
   ``DataLoader(shuffle=True)``, the same model,
   optimizer and loss (``vh.vae_loss``), and ``loss.item()`` per batch, after a partial
   warm-up (20 batches). The
   speedup is measured against num_workers=0 (pytorch/examples' CPU setting); one epoch
   with num_workers=2 is
   reported for context.
3. Floor: the FLOPs of one epoch's GEMMs (2·m·k·n each: every Linear's forward, its
weight gradient, and its input
   gradient except for the first layer, whose input needs none) over all training
   images, from the model's actual
   layer shapes, divided by the rate of a 2048³ ``torch.matmul`` measured here (median
   of 5). For context it also
   times the model's own GEMM shapes at the config's batch size: the time the GEMMs
   alone would take at that size.

The three are measured in interleaved rounds (one epoch of each loop and the GEMM rate,
back to back), and each
ratio is the median of its per-round ratios, so that a change in the machine's speed
during the run (a shared
virtual machine's neighbours) affects both sides of a ratio alike. The load average,
printed at the start and the
end, shows only this machine's own load.
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


def project_epoch(config, train_images):
    """One epoch of the project's loop, as a function to time (after a warm-up)."""
    torch.manual_seed(config["seed"])
    model = vh.model_from_config(config)
    optimizer = vh.adam(model.parameters(), config["learning_rate"])
    shuffle = torch.Generator().manual_seed(config["seed"])
    epoch = lambda: vh.train_epoch(
        model, optimizer, train_images, config["batch_size"], config["beta"], shuffle
    )
    epoch()  # warm-up
    return epoch


def dataloader_epoch(config, dataset, num_workers):
    """One epoch of the DataLoader idiom, as a function to time (after a partial
    warm-up)."""
    model, optimizer = fresh_model(config)
    loader = DataLoader(
        dataset, batch_size=config["batch_size"], shuffle=True, num_workers=num_workers
    )

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
    return epoch


def step_gemms(model, batch):
    """The (A, B) operands of every GEMM in one training step on ``batch`` images, laid
    out as autograd uses them."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    gemms = []
    for layer in linears:
        weight = torch.randn(layer.out_features, layer.in_features)
        x, dy = (
            torch.randn(batch, layer.in_features),
            torch.randn(batch, layer.out_features),
        )
        gemms += [(x, weight.t()), (dy.t(), x)]  # forward x·Wᵀ; weight gradient dyᵀ·x
        if layer is not linears[0]:
            gemms.append(
                (dy, weight)
                # input gradient dy·W (none for the first layer: data needs no gradient)
            )
    return gemms


def flops(gemms):
    return sum(
        2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in gemms
    )  # 2·m·k·n per GEMM


def gemm_rate(gemms, inner, repeats=10):
    """FLOP/s of running ``gemms`` ``inner`` times, median of ``repeats`` timings after
    a warm-up."""

    def run():
        for _ in range(inner):
            for a, b in gemms:
                torch.matmul(a, b)

    run()
    return flops(gemms) * inner / seconds(run, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config.yaml")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds, each timing one epoch of each loop",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="override the config's batch size (chapter 5 trains at 512)",
    )
    args = parser.parse_args()
    began = time.perf_counter()
    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    config = vh.load_config(args.config, **overrides)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch"
        f" {config['batch_size']}, load average at start {os.getloadavg()[0]:.2f}"
    )

    train_images = vh.mnist_splits(config, torch.device("cpu"))["train"][0]
    order = torch.randperm(
        vh.TRAINING_SET_SIZE,
        generator=torch.Generator().manual_seed(config["validation_seed"]),
    )
    normalize = transforms.Normalize(
        (config["normalize_mean"],), (config["normalize_std"],)
    )
    mnist = torchvision.datasets.MNIST(
        config["data_root"],
        train=True,
        transform=transforms.Compose([transforms.ToTensor(), normalize]),
    )
    dataset = Subset(mnist, order[config["validation_size"] :].tolist())
    assert len(dataset) == len(train_images) and torch.allclose(
        dataset[0][0].view(-1), train_images[0], atol=1e-5
    )

    model = vh.model_from_config(config)
    epoch_flops = flops(step_gemms(model, len(train_images)))
    square = torch.randn(2048, 2048)
    project, loader = (
        project_epoch(config, train_images),
        dataloader_epoch(config, dataset, num_workers=0),
    )

    # Interleaved rounds: each round times one epoch of each loop and the GEMM rate back
    # to back, so that both
    # ratios compare numbers measured under the same load; the medians over rounds are
    # reported.
    rounds = []
    for _ in range(args.rounds):
        project_seconds, loader_seconds = seconds(project, 1), seconds(loader, 1)
        floor_seconds = epoch_flops / gemm_rate([(square, square)], inner=1, repeats=5)
        rounds.append((project_seconds, loader_seconds, floor_seconds))
        print(
            f"round {len(rounds)}: project {project_seconds:.3f} s, DataLoader"
            f" {loader_seconds:.3f} s, floor {floor_seconds:.3f} s"
        )
    project_seconds, loader_seconds, floor_seconds = (
        statistics.median(column) for column in zip(*rounds)
    )
    speedups = [loader_time / project_time for project_time, loader_time, _ in rounds]
    over_floors = [project_time / floor_time for project_time, _, floor_time in rounds]
    with_workers = seconds(dataloader_epoch(config, dataset, num_workers=2), 1)
    shaped = gemm_rate(step_gemms(model, config["batch_size"]), inner=50)

    rows = [
        ("project loop (vh.train_epoch)", project_seconds),
        ("DataLoader idiom, num_workers=0 (compared)", loader_seconds),
        ("DataLoader idiom, num_workers=2 (one epoch, context)", with_workers),
        (
            f"floor: {epoch_flops / 1e9:.1f} GFLOP at the 2048^3 GEMM rate",
            floor_seconds,
        ),
        (
            (
                f"GEMMs alone at batch-{config['batch_size']} shapes,"
                f" {shaped / 1e9:.0f} GFLOP/s"
            ),
            epoch_flops / shaped,
        ),
    ]
    print(f"\nmedians of {args.rounds} rounds{'':36}s/epoch")
    for name, value in rows:
        print(f"{name:56}{value:7.3f}")
    speedup, over_floor = statistics.median(speedups), statistics.median(over_floors)
    print(
        f"\nspeedup over the DataLoader idiom (num_workers=0): {speedup:5.1f}x  target"
        f" >= 6x  {'PASS' if speedup >= 6 else 'MISS'}   (rounds"
        f" {min(speedups):.1f}-{max(speedups):.1f}x; vs num_workers=2:"
        f" {with_workers / project_seconds:.1f}x)"
    )
    print(
        f"project loop / floor:                              {over_floor:5.1f}x  target"
        f" <= 2x  {'PASS' if over_floor <= 2 else 'MISS'}   (rounds"
        f" {min(over_floors):.1f}-{max(over_floors):.1f}x)"
    )
    print(
        f"\nload average at end {os.getloadavg()[0]:.2f}; total"
        f" {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()
