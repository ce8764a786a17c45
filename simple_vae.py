"""Train the book's VAE on MNIST from the command line: ``python simple_vae.py -c
config.yaml``.

Writes into the config's output directory: the checkpoint, ``history.json``,
``recon.png`` (test images above
their reconstructions), ``gen.png`` (samples from the prior), ``progress.gif``
(validation reconstructions after
each epoch) and ``tsne.png`` (t-SNE of test-set latent means, coloured by digit); prints
the test metrics.

A finished checkpoint of the same config is reused, not retrained (``--retrain`` trains
again from scratch); an
interrupted run is continued with ``--resume``, never silently overwritten.
"""

import argparse
import json
import sys
from pathlib import Path

import vae_helpers as vh


def save_figures(model, history, data, config, output_dir, tsne_points=3000):
    """Write recon.png, gen.png, progress.gif and tsne.png into ``output_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.manifold import TSNE

    test_images, test_labels = data["test"]
    with torch.no_grad():
        originals = test_images[:16]
        reconstructions = model.decode(model.encode(originals)[0])
    pictures = {
        "recon.png": (
            torch.cat([originals, reconstructions]),
            "Test images (top) and reconstructions",
        ),
        "gen.png": (vh.sample_prior(model, 64), "Decoded samples z ~ N(0, I)"),
    }
    for name, (images, title) in pictures.items():
        plt.figure(figsize=(6, 6 if name == "gen.png" else 1.8))
        plt.imshow(
            vh.image_grid(images, config, nrow=16 if name == "recon.png" else 8),
            cmap="gray",
        )
        plt.title(title)
        plt.axis("off")
        plt.savefig(output_dir / name, dpi=120, bbox_inches="tight")
        plt.close()
    (output_dir / "progress.gif").write_bytes(vh.progress_gif(history["frames"]))
    means = vh.latent_means(model, test_images[:tsne_points]).numpy()
    embedding = TSNE(n_components=2, init="pca", random_state=0).fit_transform(means)
    plt.figure(figsize=(6, 6))
    points = plt.scatter(
        embedding[:, 0],
        embedding[:, 1],
        c=test_labels[:tsne_points].cpu(),
        cmap="tab10",
        s=3,
    )
    plt.legend(*points.legend_elements(), title="digit", loc="best", fontsize=7)
    plt.title(f"t-SNE of the latent means of {tsne_points} test images")
    plt.axis("off")
    plt.savefig(output_dir / "tsne.png", dpi=120, bbox_inches="tight")
    plt.close()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Train the MLP VAE of the book on MNIST."
    )
    parser.add_argument(
        "-c",
        "--config",
        default="config.yaml",
        help="YAML config (default: config.yaml)",
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its checkpoint",
    )
    choice.add_argument(
        "--retrain",
        action="store_true",
        help="train from scratch, replacing this config's checkpoint",
    )
    args = parser.parse_args(argv)
    try:
        config = vh.load_config(args.config)
        device = vh.select_device(config["device"])
        data = vh.mnist_splits(config, device)
        path = vh.checkpoint_path(config)
        if path.exists() and not (args.resume or args.retrain):
            epoch = vh.load_checkpoint(path)["epoch"]
            if epoch < config["epochs"]:
                raise vh.ConfigError(
                    f"'{path}' holds an interrupted run (epoch {epoch} of"
                    f" {config['epochs']}): continue it with --resume, or start over"
                    " with --retrain"
                )
            print(
                f"Reusing the trained model in {path} ({epoch} epochs); --retrain"
                " trains it again"
            )
            model, history = vh.load_or_train(config, data)
        else:
            print(
                f"Training on {device}: {len(data['train'][0])} training,"
                f" {len(data['validation'][0])} validation images; β ="
                f" {config['beta']:.4g}; checkpoint {path}"
            )
            model, history = vh.train(config, data, resume=args.resume)
    except (vh.ConfigError, vh.TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: resume with `python simple_vae.py -c {args.config}"
            " --resume`",
            file=sys.stderr,
        )
        return 130
    output_dir = Path(config["output_dir"])
    history_without_frames = {k: v for k, v in history.items() if k != "frames"}
    (output_dir / "history.json").write_text(
        json.dumps(history_without_frames, indent=1)
    )
    save_figures(model, history, data, config, output_dir)
    test = vh.evaluate(model, data["test"][0], config["beta"])
    if config["likelihood"] == "bernoulli":  # chapter 7: nats of binarized images
        print(
            f"Test -ELBO {test['reconstruction'] + test['kl']:.2f} nats ="
            f" -log p(x|z) {test['reconstruction']:.2f} + KL {test['kl']:.2f}"
        )
    else:
        print(
            f"Test loss {test['loss']:.2f} = reconstruction"
            f" {test['reconstruction']:.2f} + β × KL, KL = {test['kl']:.2f} nats (ELBO"
            f" {vh.gaussian_elbo_nats(test['loss'], config['beta']):.1f} nats"
            " under σ² = β/2)"
        )
    print(
        "Wrote history.json, recon.png, gen.png, progress.gif and tsne.png to"
        f" {output_dir}; checkpoint {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
