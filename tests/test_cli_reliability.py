"""The command line's promise (issue 13): whatever the config, the data files, the
checkpoint, the output folder and the device, ``simple_vae.py`` either works or exits 2
with one line naming the problem and the fix, before it trains; Ctrl-C exits 130 and
SIGTERM 143 with one clean line; no run leaves a corrupt or foreign checkpoint behind.

The table runs ``simple_vae.main`` in this process (milliseconds a case: every one fails
before the data are loaded); the signal, lock and kill -9 cases run the real command.
"""

import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import simple_vae
import vae_helpers as vh

ROOT = Path(__file__).resolve().parent.parent
# A tiny model: an epoch over the 55,000 training images takes a fraction of a second.
TINY = {
    "hidden_sizes": [8],
    "latent_dim": 2,
    "batch_size": 1000,
    "device": "cpu",
    "output_dir": "out",
}


# --------------------------------------------------------------------------------------
# Fixtures: a finished tiny checkpoint, fake MNIST files
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist):
    """The bytes of a finished 2-epoch checkpoint of ``TINY`` (trained on 2,000
    images), and its config file's content."""
    folder = tmp_path_factory.mktemp("finished")
    (folder / "config.yaml").write_text(yaml.safe_dump({**TINY, "epochs": 2}))
    config = vh.load_config(folder / "config.yaml")
    small = {k: (x[:2000], y[:2000]) for k, (x, y) in mnist.items()}
    vh.train(config, small, progress=False)
    return vh.checkpoint_path(config).read_bytes()


@pytest.fixture
def run_dir(tmp_path, finished, monkeypatch):
    """A tmp folder holding config.yaml (``TINY``, 2 epochs) and its finished checkpoint
    in out/; returns a function that runs the CLI in this process with extra config
    keys and arguments, returning (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CLI leaves the thread count alone
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY, "epochs": 2}))
    checkpoint = vh.checkpoint_path(vh.load_config(tmp_path / "config.yaml"))
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(finished)
    return tmp_path


def fake_mnist(root, header=None, label=None):
    """Write the four MNIST files of the right sizes under ``root/MNIST/raw`` (zeros,
    sparse: no real data), with a different header for the training images or one
    training label replaced."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, size in vh.MNIST_FILES.items():
        fields = vh.MNIST_HEADERS[name]
        if header is not None and name == "train-images-idx3-ubyte":
            fields = header
        with open(raw / name, "wb") as file:
            file.write(b"".join(n.to_bytes(4, "big") for n in fields))
            file.truncate(size)
    if label is not None:
        with open(raw / "train-labels-idx1-ubyte", "r+b") as file:
            file.seek(8 + 123)
            file.write(bytes([label]))
    return raw


def edit_checkpoint(run_dir, change):
    """Rewrite the checkpoint in ``run_dir`` after ``change(checkpoint)`` (a list that
    it returns replaces the whole checkpoint)."""
    path = next((run_dir / "out").glob("vae-*.pt"))
    checkpoint = torch.load(path, weights_only=True)
    replaced = change(checkpoint)
    torch.save(replaced if isinstance(replaced, list) else checkpoint, path)


def raise_os_error(code, under):
    """A stand-in for ``os.open`` that fails with ``code`` for paths under ``under``."""
    real_open = os.open

    def fake_open(path, *args, **kwargs):
        if str(path).startswith(str(under)):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    return fake_open


# --------------------------------------------------------------------------------------
# The table: one case per class of bad input; each exits 2 with one line, before the
# data are loaded, and leaves the checkpoint as it was
# --------------------------------------------------------------------------------------


def no_data(*args, **kwargs):
    raise AssertionError("the CLI loaded the data before refusing")


CASES = {
    # config content
    "text-number": (
        {"learning_rate": "1.0e9"},
        None,
        "write 1.0e+9, with a dot and a signed exponent",
    ),
    "text-integer": ({"epochs": "1e3"}, None, "YAML read it as text: write 1000"),
    "duplicate-key": (
        "epochs: 2\nbeta: 1\nepochs: 3\n",
        None,
        "config.yaml, line 3: duplicate key 'epochs' (first on line 1); keep one",
    ),
    "huge-file": ("# " + "x" * 1_100_000 + "\n", None, "is 1.1 MB, but a config is"),
    "deep-nesting": ("epochs: " + "[" * 5000, None, "nested too deeply"),
    "not-utf8": (b"epochs: \xff\xfe\n", None, "malformed YAML"),
    "not-a-mapping": ("- 1\n- 2\n", None, "must be a mapping"),
    "huge-model": (
        {"hidden_sizes": [10**9]},
        None,
        "use smaller hidden_sizes or latent_dim",
    ),
    "huge-seed": ({"seed": 10**30}, None, "'seed' must be an integer >= 0 (below"),
    # device
    "no-cuda": (
        {"device": "cuda"},
        "no-gpu",
        "'device' is 'cuda', but PyTorch sees no CUDA GPU on this machine; use auto"
        " or cpu",
    ),
    "no-cuda-7": (
        {"device": "cuda:7"},
        "one-gpu",
        "'device' is 'cuda:7', but PyTorch sees 1 CUDA GPU(s), cuda:0 to cuda:0",
    ),
    "no-mps": ({"device": "mps"}, "no-gpu", "'device' is 'mps', but Apple's MPS"),
    # data content
    "idx-zeros": (
        {"data_root": "mnist"},
        ("mnist", [0, 0, 0, 0], None),
        "train-images-idx3-ubyte has the IDX header [0, 0, 0, 0], expected [2051,"
        " 60000, 28, 28]",
    ),
    "idx-magic": (
        {"data_root": "mnist"},
        ("mnist", [2049, 60000, 28, 28], None),
        "has the IDX header [2049, 60000, 28, 28]",
    ),
    "idx-count": (
        {"data_root": "mnist"},
        ("mnist", [2051, 10000, 28, 84], None),
        "has the IDX header [2051, 10000, 28, 84]",
    ),
    "label-200": (
        {"data_root": "mnist"},
        ("mnist", None, 200),
        "train-labels-idx1-ubyte holds a label 200, expected 0 to 9",
    ),
    # output location
    "output-is-a-file": (
        {"output_dir": "afile"},
        "afile",
        "output_dir '{tmp}/afile' is a file, not a folder; delete or rename",
    ),
    "output-under-a-file": (
        {"output_dir": "afile/runs"},
        "afile",
        "cannot create output_dir '{tmp}/afile/runs': a part of the path is a file",
    ),
    "read-only": (
        {},
        ("oserror", errno.EROFS),
        "cannot write into output_dir '{tmp}/out': the file system is read-only; set"
        " output_dir to a folder you can write",
    ),
    "no-permission": (
        {},
        ("oserror", errno.EACCES),
        "cannot write into output_dir '{tmp}/out': permission denied",
    ),
    "disk-full": (
        {},
        "disk-full",
        "cannot write into output_dir '{tmp}/out': its disk has 0.1 MB free",
    ),
    # checkpoint content: the first message says the truth
    "other-config": (
        {},
        lambda c: c["config"].update(beta=1.0),
        "was trained with a different config (differs in: beta); start over with"
        " --retrain",
    ),
    "lacks-epoch": ({}, lambda c: c.pop("epoch"), "lacks 'epoch'; start over"),
    "wrong-shape": (
        {},
        lambda c: c["model"].update({"encoder.0.weight": torch.zeros(3, 3)}),
        "holds 'encoder.0.weight' of shape (3, 3), expected (8, 784)",
    ),
    "nan-weights": (
        {},
        lambda c: c["model"]["decoder.2.bias"].fill_(float("nan")),
        "holds NaN or infinite weights ('decoder.2.bias')",
    ),
    "bad-optimizer": (
        {},
        lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)),
        "holds an optimizer state that does not fit the model",
    ),
    "bad-random-state": (
        {},
        lambda c: c.update(torch_rng=torch.zeros(3, dtype=torch.uint8)),
        "holds an invalid random state 'torch_rng'",
    ),
    "not-a-checkpoint": ({}, lambda c: [1, 2, 3], "holds a list, not a checkpoint"),
    "interrupted": (
        {},
        "interrupted",
        "holds an interrupted run (epoch 1 of 2): continue it with --resume, or start"
        " over with --retrain",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_cli_refuses_in_one_line_before_training(case, run_dir, monkeypatch, capsys):
    config, setup, message = CASES[case]
    checkpoint = next((run_dir / "out").glob("vae-*.pt"))
    trained_with = vh.load_config(run_dir / "config.yaml")
    if isinstance(config, dict):
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump({**TINY, "epochs": 2, **config})
        )
    elif isinstance(config, bytes):
        (run_dir / "config.yaml").write_bytes(config)
    else:
        (run_dir / "config.yaml").write_text(config)
    if setup in ("no-gpu", "one-gpu"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: setup == "one-gpu")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: int(setup == "one-gpu"))
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    elif isinstance(setup, tuple) and setup[0] == "mnist":
        fake_mnist(run_dir / "mnist", header=setup[1], label=setup[2])
        monkeypatch.setenv("MNIST_ROOT", str(run_dir / "mnist"))
    elif setup == "afile":
        (run_dir / "afile").write_text("not a folder")
    elif isinstance(setup, tuple) and setup[0] == "oserror":
        monkeypatch.setattr(os, "open", raise_os_error(setup[1], run_dir / "out"))
    elif setup == "disk-full":
        usage = shutil.disk_usage(run_dir)
        monkeypatch.setattr(
            shutil, "disk_usage", lambda path: usage._replace(free=100_000)
        )
    elif setup == "interrupted":
        edit_checkpoint(run_dir, lambda c: shrink_to_epoch_1(c))
    elif callable(setup):
        edit_checkpoint(run_dir, setup)
    before = checkpoint.read_bytes()
    if not (isinstance(setup, tuple) and setup[0] == "mnist"):
        monkeypatch.setattr(vh, "mnist_splits", no_data)
    status = simple_vae.main(["-c", "config.yaml"])
    out, err = capsys.readouterr()
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message.format(tmp=run_dir) in err
    assert "--resume" not in err or case == "interrupted"
    assert checkpoint.read_bytes() == before  # the checkpoint is as it was
    if not callable(setup):  # and still a whole checkpoint (unless the case broke it)
        vh.check_checkpoint(vh.load_checkpoint(checkpoint), trained_with, checkpoint)


def shrink_to_epoch_1(checkpoint):
    """The finished 2-epoch checkpoint, cut back to look like a run interrupted after
    epoch 1 (what --resume continues)."""
    checkpoint["epoch"] = 1
    for key, values in checkpoint["history"].items():
        checkpoint["history"][key] = values[:1]


def test_tilde_in_paths_is_the_home_folder(tmp_path, monkeypatch):
    """``~`` in output_dir and data_root is the home folder, not a folder ``~``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MNIST_ROOT", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text("output_dir: ~/runs\ndata_root: ~/mnist\n")
    config = vh.load_config(path)
    assert config["output_dir"] == str(tmp_path / "home" / "runs")
    assert config["data_root"] == str(tmp_path / "home" / "mnist")


def test_cli_removes_temporary_files_of_killed_runs_only(run_dir, monkeypatch, capsys):
    checkpoint = next((run_dir / "out").glob("vae-*.pt"))
    finished_process = subprocess.Popen(["true"])
    dead = finished_process.pid
    finished_process.wait()
    stray = checkpoint.with_name(f".{checkpoint.name}.{dead}.0a1b2c3d.tmp")
    alive = checkpoint.with_name(f".{checkpoint.name}.{os.getppid()}.0a1b2c3d.tmp")
    stray.write_bytes(b"half a checkpoint")
    alive.write_bytes(b"a checkpoint being written")
    monkeypatch.setattr(vh, "mnist_splits", no_data)
    edit_checkpoint(run_dir, lambda c: c["config"].update(beta=1.0))
    assert simple_vae.main(["-c", "config.yaml"]) == 2
    assert not stray.exists() and alive.exists()


def test_a_failed_save_says_the_disk_is_full_and_the_checkpoint_is_intact(
    run_dir, monkeypatch, capsys
):
    """A full disk during training: one line, exit 2, the epoch-1 checkpoint intact and
    no temporary file left; --resume (named in the message) accepts the checkpoint."""
    edit_checkpoint(run_dir, shrink_to_epoch_1)
    checkpoint = next((run_dir / "out").glob("vae-*.pt"))
    before = checkpoint.read_bytes()
    real_save = torch.save

    def full_disk(obj, file, *args, **kwargs):
        real_save(obj, io.BytesIO())
        file.write(b"the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    status = simple_vae.main(["-c", "config.yaml", "--resume"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar of the epoch
    assert status == 2 and "Traceback" not in err and last.startswith("error: "), err
    assert (
        f"cannot save checkpoint '{checkpoint}': the disk is full (no space left on the"
        " device); the checkpoint of epoch 1 of 2 is intact: free some space or fix"
        " the folder, then continue it with `python simple_vae.py -c config.yaml"
        " --resume`" in last
    )
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == sorted(
        [checkpoint.name, f".{checkpoint.name}.lock"]
    )
    config = vh.load_config(run_dir / "config.yaml")
    vh.check_checkpoint(vh.load_checkpoint(checkpoint), config, checkpoint)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_refuses_a_folder_without_write_permission(run_dir, monkeypatch, capsys):
    (run_dir / "out").chmod(0o500)
    try:
        assert simple_vae.main(["-c", "config.yaml"]) == 2
    finally:
        (run_dir / "out").chmod(0o700)
    assert "cannot write into output_dir" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# save_checkpoint under fault injection
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["torch.save", "fsync", "rename", "kill"])
def test_a_failed_checkpoint_write_leaves_the_previous_one(step, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    vh.save_checkpoint(path, {"epoch": 1, "weights": torch.ones(3)})
    real_save = torch.save

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_half(obj, file, *args, **kwargs):
        real_save(obj, file)
        file.write(b"garbage")
        fail()

    target = {"torch.save": (torch, "save", save_half), "fsync": (os, "fsync", fail)}
    target["rename"] = (os, "replace", fail)
    if step == "kill":  # kill -9 between the write and the rename: a stray file
        stray = tmp_path / f".model.pt.{os.getpid() + 10**6}.deadbeef.tmp"
        stray.write_bytes(b"half a checkpoint")
    else:
        monkeypatch.setattr(*target[step])
        with pytest.raises(OSError, match="No space left"):
            vh.save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(3)})
        monkeypatch.undo()
        assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert vh.load_checkpoint(path)["epoch"] == 1
    vh.save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(3)})  # a later save
    assert vh.load_checkpoint(path)["epoch"] == 2


def test_parallel_saves_never_share_a_temporary_file(tmp_path):
    """Two writers saving the same checkpoint 30 times each while it is read: every save
    succeeds, every read finds a whole checkpoint, no temporary file remains."""
    import threading

    path, errors = tmp_path / "shared.pt", []

    def write(worker):
        try:
            for i in range(30):
                vh.save_checkpoint(path, {"i": i, "w": torch.full((5000,), worker)})
        except Exception as error:  # reported by the assertion below
            errors.append(error)

    writers = [threading.Thread(target=write, args=(k,)) for k in range(2)]
    for writer in writers:
        writer.start()
    while any(writer.is_alive() for writer in writers):
        if path.exists():
            assert vh.load_checkpoint(path)["w"].shape == (5000,)
    assert errors == [] and [p.name for p in tmp_path.iterdir()] == ["shared.pt"]


# --------------------------------------------------------------------------------------
# Output that nobody reads, or that cannot hold β
# --------------------------------------------------------------------------------------


def test_output_into_a_closed_pipe_or_an_ascii_terminal_never_raises():
    reader, writer = os.pipe()
    os.close(reader)
    closed = simple_vae.SafeStream(open(writer, "w", encoding="utf-8"))
    closed.write("Training on cpu\n")  # EPIPE: silenced, sent to /dev/null from now on
    closed.write("Test loss\n")
    closed.flush()
    ascii_only = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    simple_vae.SafeStream(ascii_only).write("β × KL, σ² = β/2 ≈ ✓\n")
    ascii_only.flush()
    assert ascii_only.buffer.getvalue() == b"beta x KL, sigma^2 = beta/2 ? ?\n"


# --------------------------------------------------------------------------------------
# The real command: signals, the lock, kill -9
# --------------------------------------------------------------------------------------


def start_cli(folder, stdout=subprocess.PIPE, environment=(), **config):
    """Start ``simple_vae.py`` on a ``TINY`` config in ``folder`` (Ctrl-C enabled even
    when the tests run in the background); return the process."""
    (folder / "config.yaml").write_text(yaml.safe_dump({**TINY, **config}))
    return subprocess.Popen(
        [sys.executable, "-u", str(ROOT / "simple_vae.py"), "-c", "config.yaml"],
        cwd=folder,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **dict(environment)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, seconds=120):
    ends = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < ends, "timed out"
        time.sleep(0.05)


def epoch_on_disk(folder):
    """The epoch of the checkpoint in folder/out, or 0 when there is none yet."""
    files = list((folder / "out").glob("vae-*.pt"))
    return vh.load_checkpoint(files[0])["epoch"] if files else 0


def test_ctrl_c_during_training_keeps_the_last_checkpoint_and_says_resume(tmp_path):
    """Ctrl-C after epoch 1: exit 130, one clean line (after the progress bar) naming
    the intact checkpoint and --resume, which accepts that checkpoint. Its output goes
    into a pipe nobody reads (like ``| head -0``): no BrokenPipeError either."""
    reader, writer = os.pipe()
    os.close(reader)
    process = start_cli(tmp_path, stdout=writer, epochs=1000)
    os.close(writer)
    wait_for(lambda: epoch_on_disk(tmp_path) >= 1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # after tqdm's progress bar
    epoch = epoch_on_disk(tmp_path)
    assert last == (
        f"interrupted during training; the checkpoint of epoch {epoch} of 1000 is"
        " intact: continue it with `python simple_vae.py -c config.yaml --resume`"
    ), last
    path = next((tmp_path / "out").glob("vae-*.pt"))
    config = vh.load_config(tmp_path / "config.yaml")
    vh.check_checkpoint(vh.load_checkpoint(path), config, path)  # --resume takes it


def test_sigterm_while_drawing_the_figures_exits_143_in_one_line(tmp_path, finished):
    (tmp_path / "out").mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY, "epochs": 2}))
    path = vh.checkpoint_path(vh.load_config(tmp_path / "config.yaml"))
    path.write_bytes(finished)
    process = start_cli(tmp_path, epochs=2)
    assert process.stdout.readline().startswith("Reusing the trained model")
    assert process.stdout.readline().startswith("Drawing the figures")
    time.sleep(0.5)  # inside the drawing
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err == (
        "terminated (SIGTERM) while drawing the figures; the trained model is intact"
        f" in '{path}': `python simple_vae.py -c config.yaml` draws them again\n"
    )
    assert path.read_bytes() == finished


def test_a_second_run_is_locked_out_until_the_first_is_killed_9(
    tmp_path, capsys, monkeypatch
):
    """While a run trains, a second run of its config is refused, naming its process;
    kill -9 releases the lock, and the checkpoint left is one --resume accepts. Its
    output goes to an ASCII-only stdout: β is written beta."""
    process = start_cli(
        tmp_path, environment={"PYTHONIOENCODING": "ascii"}, epochs=1000
    )
    wait_for(lambda: epoch_on_disk(tmp_path) >= 1)
    monkeypatch.setattr(vh, "mnist_splits", no_data)
    assert simple_vae.main(["-c", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"another run (process {process.pid}) is training this config" in err
    process.kill()
    out, err = process.communicate(timeout=60)
    assert out.startswith("Training on cpu with 1 thread(s):") and "; beta = " in out
    assert simple_vae.main(["-c", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert "holds an interrupted run (epoch" in err and "another run" not in err
    path = next((tmp_path / "out").glob("vae-*.pt"))
    config = vh.load_config(tmp_path / "config.yaml")
    vh.check_checkpoint(vh.load_checkpoint(path), config, path)


@pytest.mark.parametrize(
    "busy, threads", [(0.1, 2), (0.4, 2), (0.6, 1), (1.0, 1), (5.0, 1)]
)
def test_the_cli_uses_one_thread_per_core_left_idle(busy, threads, monkeypatch):
    """On 2 cores: both when the others leave the machine quiet, one as soon as they
    keep a core busy (2 threads then made an epoch 5-40 times slower). ``busy`` is the
    number of cores the other processes kept busy while the run started."""

    class FakeTorch:
        chosen = None

        def get_num_threads(self):
            return 2

        def set_num_threads(self, n):
            self.chosen = n

    fake = FakeTorch()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    # one second, in which this process used 0.9 s of CPU and the others `busy`
    snapshots = iter([(10.0, 100.0, 5.0), (11.0, 100.0 + 0.9 + busy, 5.9)])
    monkeypatch.setattr(simple_vae, "cpu_snapshot", lambda: next(snapshots))
    since = simple_vae.cpu_snapshot()
    assert simple_vae.choose_threads(fake, torch.device("cpu"), since) == threads
    assert fake.chosen == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit choice is left alone
    monkeypatch.setattr(simple_vae, "cpu_snapshot", lambda: (12.0, 200.0, 6.0))
    assert simple_vae.choose_threads(fake, torch.device("cpu"), since) == 2
