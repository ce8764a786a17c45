"""Train the book's VAE on MNIST from the command line: ``python simple_vae.py -c
config.yaml``.

Writes into the config's output directory: the checkpoint, ``history.json``,
``recon.png`` (test images above their reconstructions), ``gen.png`` (samples from the
prior), ``progress.gif`` (validation reconstructions after each epoch) and ``tsne.png``
(t-SNE of test-set latent means, coloured by digit); prints the test metrics.

A finished checkpoint of the same config is reused, not retrained (``--retrain`` trains
again from scratch); an interrupted run is continued with ``--resume``, never silently
overwritten.

Whatever the config, the data files, the checkpoint, the output folder and the device, a
run either works or exits with status 2 and one line naming the problem and its fix,
before it trains: the config, the device, the model's memory, the output folder (a
folder, writable, with room), a second run of the same config (a lock), the checkpoint's
content and the MNIST files are all checked first. Ctrl-C exits with 130 and SIGTERM
with 143, in one line that says what is intact and what to run next.
"""

import argparse
import errno
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

RETRAIN = "start over with --retrain (it replaces the file), or delete it"
OS_ERRORS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full (no space left on the device)",
    getattr(errno, "EDQUOT", -1): "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "the path is too long",
    errno.EIO: "an input/output error (a failing disk or a lost network drive)",
}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread the way Ctrl-C raises KeyboardInterrupt."""


def describe_os_error(error):
    """What went wrong, in words, for an ``OSError`` (its errno, not its class)."""
    return OS_ERRORS.get(error.errno) or (error.strerror or type(error).__name__)


def save_figures(model, history, data, config, output_dir, tsne_points=3000):
    """Write recon.png, gen.png, progress.gif and tsne.png into ``output_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.manifold import TSNE

    import vae_helpers as vh

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
            vh.image_grid(
                images, config, nrow=16 if name == "recon.png" else 8
            ).numpy(),
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
        c=test_labels[:tsne_points].cpu().numpy(),
        cmap="tab10",
        s=3,
    )
    plt.legend(*points.legend_elements(), title="digit", loc="best", fontsize=7)
    plt.title(f"t-SNE of the latent means of {tsne_points} test images")
    plt.axis("off")
    plt.savefig(output_dir / "tsne.png", dpi=120, bbox_inches="tight")
    plt.close()


class SafeStream:
    """stdout or stderr that never ends a run with a traceback: once the reader is gone
    (``| head -1``) output goes to /dev/null, and characters that the encoding lacks (an
    ASCII-only terminal) are spelled out in ASCII."""

    ASCII = str.maketrans({"β": "beta", "σ": "sigma", "²": "^2", "×": "x", "…": "..."})

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            text.encode(self.stream.encoding or "utf-8")
        except UnicodeEncodeError:
            encoding = self.stream.encoding
            text = (
                text.translate(self.ASCII).encode(encoding, "replace").decode(encoding)
            )
        except LookupError:
            pass
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe or terminal
            self.silence()
        return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self.silence()

    def silence(self):
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def check_output_dir(output_dir, needed_bytes):
    """Raise ``ConfigError`` unless ``output_dir`` is (or can become) a folder with room
    for ``needed_bytes``; writing into it is tested by ``lock_run``."""
    import vae_helpers as vh

    fix = "set output_dir to a folder you can write"
    if output_dir.exists() and not output_dir.is_dir():
        raise vh.ConfigError(
            f"output_dir '{output_dir}' is a file, not a folder; delete or rename the"
            " file, or set output_dir to another path"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(output_dir).free
    except OSError as error:
        raise vh.ConfigError(
            f"cannot create output_dir '{output_dir}':"
            f" {describe_os_error(error)}; {fix}"
        ) from None
    if free < needed_bytes:
        raise vh.ConfigError(
            f"cannot write into output_dir '{output_dir}': its disk has"
            f" {free / 1e6:.1f} MB free, and this run needs about"
            f" {needed_bytes / 1e6:.0f} MB; free some space, or {fix}"
        )


def lock_run(checkpoint):
    """Hold a lock on this checkpoint until the process ends, or refuse in one line.

    ``fcntl.flock`` locks are released by the kernel when the process ends, even by kill
    -9, so a crashed run never leaves the lock stuck. Writing the process id into the
    lock file also tests that ``output_dir`` can be written. Returns the open file
    descriptor (closing it releases the lock); no lock where ``fcntl`` is missing.
    """
    import vae_helpers as vh

    lock = checkpoint.with_name(f".{checkpoint.name}.lock")
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise vh.ConfigError(
            f"cannot write into output_dir '{checkpoint.parent}':"
            f" {describe_os_error(error)}; set output_dir to a folder you can write"
        ) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
        os.close(descriptor)
        raise vh.ConfigError(
            f"another run (process {holder}) is training this config into"
            f" '{checkpoint}'; wait for it to end, or stop it (kill {holder})"
        ) from None
    except OSError:  # a file system without locks (some network drives): run unlocked
        pass
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        os.fsync(descriptor)
    except OSError as error:
        os.close(descriptor)
        raise vh.ConfigError(
            f"cannot write into output_dir '{checkpoint.parent}':"
            f" {describe_os_error(error)}; set output_dir to a folder you can write"
        ) from None
    return descriptor


def remove_stray_temporaries(checkpoint):
    """Delete temporary files of this checkpoint left by runs that were killed (their
    process no longer exists); called while holding the lock."""
    for file in checkpoint.parent.glob(f".{checkpoint.name}.*.tmp"):
        try:
            os.kill(int(file.name.split(".")[-3]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            file.unlink(missing_ok=True)
        except OSError:  # alive, another user's process
            pass


def check_resources(config, device):
    """Refuse, before any data is loaded, a model too big for this machine's memory;
    return the disk space a run needs (checkpoints, old and new, and the figures)."""
    import torch

    import vae_helpers as vh

    with torch.device("meta"):
        parameters = sum(p.numel() for p in vh.model_from_config(config).parameters())
    # weights, gradients and Adam's two moments, in float32
    needed = 16 * parameters
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            memory = None
    if memory and needed > memory:
        raise vh.ConfigError(
            f"the model of this config has {parameters:,} parameters: training needs"
            f" about {needed / 1e9:.0f} GB, more than the {memory / 1e9:.0f} GB of"
            f" {'this machine' if device.type == 'cpu' else device}; use smaller"
            " hidden_sizes or latent_dim"
        )
    frames = config["epochs"] * vh.PROGRESS_IMAGES * vh.PIXELS
    return 2 * (3 * 4 * parameters + frames) + 5_000_000


def cpu_snapshot():
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this
    process), from /proc/stat; None where there is no /proc (macOS, Windows)."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(n) for n in stat.readline().split()[1:9]]
        per_second = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    own = os.times()
    return time.monotonic(), busy / per_second, own.user + own.system


def choose_threads(torch, device, since):
    """One thread per core that other processes leave idle, measured from ``since`` (a
    ``cpu_snapshot`` taken when the run started) until now.

    On a busy CPU, PyTorch's default of one thread per core makes its threads spin
    against the other processes (an epoch took 9-66 s instead of 1.6 s with one thread);
    on a quiet CPU the default is fastest, and is kept. The load average is not used: it
    lags by a minute, and would cost the quiet case its second thread. An explicit
    OMP_NUM_THREADS is left alone. Returns the number of threads.
    """
    now = cpu_snapshot()
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or not since or not now:
        return torch.get_num_threads()
    seconds = now[0] - since[0]
    if seconds < 0.2:  # too short to measure
        return torch.get_num_threads()
    others = ((now[1] - since[1]) - (now[2] - since[2])) / seconds  # busy cores
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, min(torch.get_num_threads(), round(cores - others)))
    torch.set_num_threads(threads)
    return threads


def checkpoint_state(path, config, command):
    """What is on disk now and what to run next, for the one-line messages after an
    interruption or a failed save: ``(state, next_step)``."""
    import vae_helpers as vh

    if not path.exists():
        return "no checkpoint was written yet", f"run `{command}` again"
    try:
        checkpoint = vh.load_checkpoint(path)
        vh.check_checkpoint(checkpoint, config, path)
    except vh.ConfigError:  # what --retrain found there, still unusable
        return (
            "no checkpoint of this config was written yet",
            f"run `{command} --retrain` again",
        )
    epoch = checkpoint["epoch"]
    if epoch < config["epochs"]:
        return (
            f"the checkpoint of epoch {epoch} of {config['epochs']} is intact",
            f"continue it with `{command} --resume`",
        )
    return "the trained model's checkpoint is intact", f"`{command}` reuses it"


def run(args, stage):
    """The whole run; ``stage`` tells the interruption handler where it stopped."""
    started = cpu_snapshot()
    import vae_helpers as vh

    try:
        config = vh.load_config(args.config)
        device = vh.select_device(config["device"])
        needed = check_resources(config, device)
        output_dir = Path(config["output_dir"])
        check_output_dir(output_dir, needed)
        path = vh.checkpoint_path(config)
        stage.update(config=config, path=path)
        stage["lock"] = lock_run(path)
        remove_stray_temporaries(path)
        reuse = False
        if path.exists() and not args.retrain:
            checkpoint = vh.load_checkpoint(path, fix=RETRAIN)
            vh.check_checkpoint(checkpoint, config, path, fix=RETRAIN)
            epoch = checkpoint["epoch"]
            if epoch < config["epochs"] and not args.resume:
                raise vh.ConfigError(
                    f"'{path}' holds an interrupted run (epoch {epoch} of"
                    f" {config['epochs']}): continue it with --resume, or start over"
                    " with --retrain"
                )
            reuse = epoch >= config["epochs"]
            del checkpoint
        import torch

        threads = choose_threads(torch, device, started)
        data = vh.mnist_splits(config, device)
        if reuse:
            print(
                f"Reusing the trained model in {path} ({config['epochs']} epochs);"
                " --retrain trains it again"
            )
            model, history = vh.load_or_train(config, data)
        else:
            print(
                f"Training on {device}"
                f"{f' with {threads} thread(s)' if device.type == 'cpu' else ''}:"
                f" {len(data['train'][0])} training,"
                f" {len(data['validation'][0])} validation images; β ="
                f" {config['beta']:.4g}; checkpoint {path}"
            )
            stage["phase"] = "training"
            try:
                model, history = vh.train(config, data, resume=args.resume)
            except OSError as error:
                done, then = checkpoint_state(path, config, stage["command"])
                raise vh.ConfigError(
                    f"cannot save checkpoint '{path}': {describe_os_error(error)};"
                    f" {done}: free some space or fix the folder, then {then}"
                ) from None
        stage["phase"] = "figures"
        print("Drawing the figures (the t-SNE takes about 10 s)")
        try:
            history_without_frames = {k: v for k, v in history.items() if k != "frames"}
            (output_dir / "history.json").write_text(
                json.dumps(history_without_frames, indent=1)
            )
            save_figures(model, history, data, config, output_dir)
        except OSError as error:
            raise vh.ConfigError(
                f"cannot write the figures into output_dir '{output_dir}':"
                f" {describe_os_error(error)}; the trained model is intact in"
                f" '{path}': free some space or fix the folder, then run"
                f" `{stage['command']}` again"
            ) from None
        test = vh.evaluate(model, data["test"][0], config["beta"])
    except (vh.ConfigError, vh.TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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


def interrupted(stage, what):
    """The one line after Ctrl-C or SIGTERM: where the run stopped, what is intact, and
    what to run next."""
    if stage["phase"] == "figures":
        return (
            f"{what} while drawing the figures; the trained model is intact in"
            f" '{stage['path']}': `{stage['command']}` draws them again"
        )
    if stage["phase"] == "training":
        done, then = checkpoint_state(stage["path"], stage["config"], stage["command"])
        return f"{what} during training; {done}: {then}"
    return f"{what} before training began; no checkpoint was changed"


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
    stage = {
        "phase": "setup",
        "lock": None,
        "command": f"python simple_vae.py -c {args.config}",
    }

    def terminate(number, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # main() called outside the main thread: no SIGTERM handler
        previous = None
    try:
        return run(args, stage)
    except (KeyboardInterrupt, Terminated) as stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: no traceback
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ctrl_c = isinstance(stop, KeyboardInterrupt)
        message = interrupted(
            stage, "interrupted" if ctrl_c else "terminated (SIGTERM)"
        )
        print(("\n" if ctrl_c else "") + message, file=sys.stderr)
        return 130 if ctrl_c else 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if stage["lock"] is not None:
            os.close(stage["lock"])


if __name__ == "__main__":
    sys.stdout, sys.stderr = SafeStream(sys.stdout), SafeStream(sys.stderr)
    sys.exit(main())
