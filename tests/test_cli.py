"""The command line: bad input gets one clear line and a non-zero exit, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_processes, running, slow_loading, write_image

from alexnet.cli import main

TINY_ARGS = [
    "--preset",
    "torchvision",
    "--batch-size",
    "4",
    "--image-size",
    "72",
    "--crop",
    "64",
    "--workers",
    "0",
    "--no-progress",
]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "alexnet", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def run_main(capsys, *args):
    """`alexnet ARGS` in this process (a subprocess costs seconds of imports): its exit status and
    output, as run_cli's. An unexpected exception fails the test with its traceback."""
    capsys.readouterr()
    try:
        code = main(list(map(str, args)))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_line_error(result, pattern):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("alexnet: error:") and pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One trained tiny run shared by the evaluate and predict tests."""
    from conftest import scoped_folder
    from conftest import write_image as w

    with scoped_folder(tmp_path_factory, "cli") as root:
        data = root / "data"
        for wnid, colour in {"n001_red": (220, 40, 40), "n002_green": (40, 200, 40)}.items():
            for split, n in (("train", 6), ("val", 2)):
                for i in range(n):
                    w(data / split / wnid / f"{i}.JPEG", colour=colour)
        (data / "classes.tsv").write_text("index\twnid\tname\n0\tn001_red\tred thing\n1\tn002_green\tgreen thing\n")
        assert main(["train", "--data", str(data), "--run-dir", str(root / "run"), "--epochs", "1", *TINY_ARGS]) == 0
        yield data, root / "run"


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["info", "--preset", "bogus"], "unknown preset 'bogus'"),
        (["train", "--data", "/no/such/folder"], "does not exist"),
        (["train", "--preset", "vgg", "--data", "."], "unknown preset"),
        (["train", "--lr", "-1", "--data", "."], "lr must be"),
        (["train", "--batch-size", "many", "--data", "."], "invalid int value"),
        (["train", "--schedule", "linear", "--data", "."], "unknown schedule"),
        (["train", "--no-such-option"], "unrecognized arguments"),
        (["train", "--resume", "/no/such/run"], "cannot be resumed"),
        (["evaluate", "--checkpoint", "/no/such.pt", "--data", "."], "does not exist"),
        (["train", "--cuda-graphs", "--device", "cpu", "--run-dir", "/no/run", "--data", "."], "need a CUDA device"),
        (["benchmark", "--cuda-graphs", "--device", "cpu"], "need a CUDA device"),
        (["train", "--crop", "200", "--data", "."], "paper preset takes 224-255 pixel inputs"),
        (["train", "--preset", "torchvision", "--crop", "40", "--data", "."], "inputs of 63 pixels or more"),
        (["train", "--device", "mps", "--data", "."], "device 'mps' is not supported"),
        (["train", "--device", "meta", "--data", "."], "device 'meta' is not supported"),
        (["train", "--seed", "1000000000000000", "--data", "."], "seed must be in"),
        (["train", "--freeze", "features,fc6..fc8", "--data", "."], "freezes every layer"),
        (["train", "--data", __file__], "is a file, not a folder"),
        (["convert", "--from", "torchvision", __file__, "--out", str(Path(__file__).parent)], "is a directory"),
    ],
)
def test_bad_input_is_one_line(args, pattern, capsys):
    assert_one_line_error(run_main(capsys, *args), pattern)


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["info", "--preset", "bogus"], "unknown preset 'bogus'"),
        (["train", "--no-such-option"], "unrecognized arguments"),
        (["train", "--data", "/no/such/folder"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_from_the_installed_command(args, pattern):
    """The same, as a user runs it: `python -m alexnet` in a process of its own."""
    assert_one_line_error(run_cli(*args), pattern)


def test_a_run_that_stops_before_writing_anything_leaves_no_directory(tmp_path):
    """A wrong data path found after the run directory was made: the directory goes too, and the
    folders made above it (runs/); one that existed before (a resumed run's) stays, and so does a
    folder above that holds other runs."""
    run = tmp_path / "runs" / "new"
    assert_one_line_error(run_cli("train", "--data", tmp_path / "none", "--run-dir", run), "does not exist")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "old").mkdir(parents=True)
    assert_one_line_error(run_cli("train", "--data", tmp_path / "none", "--run-dir", run), "does not exist")
    assert not run.exists() and (tmp_path / "runs" / "old").is_dir()
    run.mkdir(parents=True)
    assert_one_line_error(run_cli("train", "--data", tmp_path / "none", "--run-dir", run), "does not exist")
    assert run.is_dir()


def test_mismatched_classes_and_corrupt_checkpoint(tmp_path):
    write_image(tmp_path / "d" / "train" / "a" / "1.JPEG")
    write_image(tmp_path / "d" / "train" / "b" / "1.JPEG")
    write_image(tmp_path / "d" / "val" / "a" / "1.JPEG")
    assert_one_line_error(run_cli("train", "--data", tmp_path / "d"), "differ from the training classes")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(
        run_cli("predict", "--checkpoint", tmp_path / "bad.pt", tmp_path / "d"), "cannot read checkpoint"
    )


def test_info_prints_the_layer_table_and_deviations(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "96 x 55 x 55" in out and "256 x 6 x 6" in out and "60,965,224" in out
    assert main(["info", "--preset", "seed"]) == 0
    out = capsys.readouterr().out
    assert "deviations from the paper" in out and "4098" in out and "11-channel window" in out


def test_resume_refuses_a_different_config(tiny_run):
    _, run = tiny_run
    assert_one_line_error(run_cli("train", "--resume", run, "--lr", "0.5"), "cannot change it")
    assert_one_line_error(run_cli("train", "--resume", run, "--run-dir", "elsewhere"), "--run-dir cannot differ")


def test_resume_can_extend_epochs(tiny_run, tmp_path):
    import shutil

    _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # the run directory named again, and the preset's own initialisation named: neither is a change;
    # DDP's bucket size is how it runs, not what it computes
    args = ["train", "--resume", str(copy), "--run-dir", str(copy), "--init", "kaiming", "--epochs", "2"]
    assert main([*args, "--ddp-bucket-mb", "50", "--no-progress"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert json.loads((copy / "config.json").read_text())["epochs"] == 2  # what a plain --resume goes on with


def test_a_resumed_run_can_turn_a_flag_off(tiny_run, tmp_path):
    """A run made with --cuda-graphs, resumed where there is no GPU: refused in one line, and resumed
    with --no-cuda-graphs (flags given --no- forms for this)."""
    import shutil

    _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "cuda_graphs": True}))
    assert_one_line_error(run_cli("train", "--resume", copy, "--epochs", "2"), "CUDA graphs need a CUDA device")
    assert main(["train", "--resume", str(copy), "--epochs", "2", "--no-cuda-graphs", "--no-progress"]) == 0
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 2


def test_existing_run_dir_is_refused(tiny_run):
    data, run = tiny_run
    assert_one_line_error(run_cli("train", "--data", data, "--run-dir", run), "already exists")


def test_evaluate_writes_a_report(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--ten-crop", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "center: top-1 error" in out and "ten_crop: top-1 error" in out and "on 4 images" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["ten_crop"]["images"] == 4
    assert (tmp_path / "confusion.csv").read_text().startswith("true\\predicted,n001_red,n002_green")


def test_predict_shows_names_and_probabilities(tiny_run, tmp_path, capsys):
    import torch

    from alexnet.data.folders import load_image
    from alexnet.inspect.evaluate import class_probabilities
    from alexnet.interop.export import load_for_inference

    data, run = tiny_run
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    files = [str(data / "val" / "n001_red" / "0.JPEG"), str(tmp_path / "broken.jpg")]
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--json", *files]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert len(result) == 1 and len(result[0]["top"]) == 2
    assert {p["name"] for p in result[0]["top"]} == {"red thing", "green thing"}
    assert abs(sum(p["probability"] for p in result[0]["top"]) - 1) < 1e-5
    assert "broken.jpg: cannot read" in captured.err
    # most likely first, with its own class and name: the model's probabilities, computed here
    model, stats, ckpt = load_for_inference(run / "best.pt", torch.device("cpu"))
    with torch.no_grad():
        image = load_image(files[0], ckpt["config"]["image_size"])[None]
        probs = class_probabilities(model, image, stats, ckpt["config"]["crop"], False)[0]
    top, best = result[0]["top"], int(probs.argmax())
    assert top[0]["probability"] > top[1]["probability"] and abs(top[0]["probability"] - float(probs[best])) < 1e-5
    assert (top[0]["class"], top[0]["name"]) == (ckpt["classes"][best], ckpt["names"][best])
    assert (top[1]["class"], top[1]["name"]) == (ckpt["classes"][1 - best], ckpt["names"][1 - best])


def test_default_train_makes_the_synthetic_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the real default, cut to one epoch at a small size so that the test stays short
    assert main(["train", "--epochs", "1", "--run-dir", "demo", *TINY_ARGS, "--batch-size", "50"]) == 0
    assert (tmp_path / "alexnet-demo-data" / "train").is_dir()
    assert json.loads((tmp_path / "demo" / "config.json").read_text())["data"] == str(tmp_path / "alexnet-demo-data")
    assert (Path(tmp_path) / "demo" / "eval.json").is_file()


def test_a_bad_option_without_data_is_refused_before_the_demo_is_rendered(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "seed", "--lrn-per-tower"]) == 2
    assert "lrn_per_tower applies to the paper preset" in capsys.readouterr().err
    assert not (tmp_path / "alexnet-demo-data").exists()


def test_sigterm_to_the_process_group_stops_cleanly_and_resumes(tiny_dataset, tmp_path):
    """Preemption signals the whole process group, data-loader workers included."""
    import os
    import signal
    import time

    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "alexnet",
        "train",
        "--data",
        str(tiny_dataset),
        "--run-dir",
        str(run),
        "--epochs",
        "20",
        "--log-every",
        "1",
        *TINY_ARGS[:-3],
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    seen, deadline = b"", time.time() + 120
    # the epoch's progress bar reached step 2 (the statistics' bar counts to 5 too)
    while b" 2/5 " not in seen.partition(b"epoch 1/20")[2] and time.time() < deadline:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    os.killpg(proc.pid, signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last and f"alexnet train --resume {run}" in last
    assert main(["train", "--resume", str(run), "--epochs", "1", "--no-progress"]) == 0
    assert (run / "eval.json").is_file()


CLI_MAIN = "import sys\nfrom alexnet.cli import main\nsys.exit(main(sys.argv[1:]))\n"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists worker processes from Linux's /proc")
@pytest.mark.parametrize("command", ["evaluate", "features"])
def test_sigterm_stops_other_commands_in_one_line(command, tiny_run, tmp_path):
    """Commands without an orderly stop of their own unwind on SIGTERM as on Ctrl-C: one line, exit
    143, the data-loader workers gone, and no file half-written (they are written atomically)."""
    import os
    import signal
    import time

    data, run = tiny_run
    out = tmp_path / ("report" if command == "evaluate" else "features.npz")
    args = ["--checkpoint", str(run), "--workers", "1", "--no-progress", "--out", str(out)]
    args += ["--data", str(data)] if command == "evaluate" else ["--layer", "fc7", str(data / "val")]
    mark = tmp_path / "loading"
    proc = subprocess.Popen(
        [sys.executable, "-c", slow_loading(1) + CLI_MAIN, command, *args],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "MARK": str(mark)},
    )
    deadline = time.monotonic() + 60
    while not mark.exists():  # the data-loader worker is loading images
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    workers = child_processes(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "alexnet: stopped by SIGTERM" and "Traceback" not in err, err
    assert not [p for p in workers if running(p)]
    assert not out.exists() or (out.is_dir() and not any(out.iterdir())), "nothing half-written is left"


def test_prepare_command_and_check(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "prepared"
    args = ["prepare", str(tiny_dataset), str(out), "--format", "jpeg", "--workers", "0", "--no-progress"]
    assert main(args) == 0
    assert "ok, jpeg 256x256, train 18, val 6 images, 3 classes" in capsys.readouterr().out
    assert main(["prepare", "--check", str(out)]) == 0
    (out / "manifest.json").unlink()
    assert_one_line_error(run_cli("prepare", "--check", out), "not a finished prepared dataset")


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["predict", "--checkpoint", "c.pt", "--top", "-1", "x.jpg"], "argument --top: must be at least 1, not -1"),
        (["predict", "--checkpoint", "c.pt", "--top", "0", "x.jpg"], "argument --top: must be at least 1, not 0"),
        (["evaluate", "--checkpoint", "c.pt", "--data", ".", "--batch-size", "0"], "--batch-size: must be at least 1"),
        (["evaluate", "--checkpoint", "c.pt", "--data", ".", "--workers", "-1"], "--workers: must be at least 0"),
        (["features", "--checkpoint", "c.pt", "--layer", "fc7", "x", "--out", "f.npz", "--batch-size", "0"], "least 1"),
        (["figures", "run", "--workers", "-2"], "argument --workers: must be at least 0, not -2"),
        (["benchmark", "--rounds", "0"], "argument --rounds: must be at least 1, not 0"),
        (["info", "--input-size", "256"], "--input-size 256: the paper preset takes"),
        (["info", "--input-size", "10"], "--input-size 10: the paper preset takes"),
        (["info", "--preset", "torchvision", "--input-size", "10"], "--input-size 10: the torchvision preset takes"),
        (["info", "--input-size", "0"], "argument --input-size: must be at least 1, not 0"),  # not the default
        (["export", "--checkpoint", "c.pt", "--format", "onnx", "--out", "m.onnx", "--input-size", "0"], "at least 1"),
        (["nonsense"], "invalid choice: 'nonsense' (choose from 'train', "),
        (["nonsense"], "(see alexnet --help)"),
        (["train", "--epochs", "x"], "argument --epochs: invalid int value: 'x' (see alexnet train --help)"),
        (["train", "--bogus"], "unrecognized arguments: --bogus (see alexnet train --help)"),
        (
            ["evaluate", "--checkpoint", "c.pt", "--data", ".", "x"],
            "unrecognized arguments: x (see alexnet evaluate --help)",
        ),
    ],
)
def test_invalid_numbers_are_one_line(args, pattern, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alexnet: error:") and pattern in err[0], err


def test_evaluate_labels_folders_by_the_checkpoints_classes(tiny_run, tmp_path, capsys):
    """A checkpoint whose classes are not in folder order (a conversion's) and are more than the data
    holds (an ImageNet model on Imagenette): folders labelled by name, scored over the model's whole
    output; a folder that is not one of its classes is named; a prepared dataset is refused in one line."""
    import shutil

    import torch

    from alexnet.checkpoint import load_checkpoint, save_checkpoint
    from alexnet.data.prepare import prepare_dataset

    data, run = tiny_run
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--no-progress"]) == 0
    before = capsys.readouterr()
    ckpt = load_checkpoint(run / "best.pt")
    model = dict(ckpt["model"])
    weight, bias = list(model)[-2:]  # fc8's: its rows moved with the classes; the unseen class never wins
    model[weight] = torch.stack([model[weight][1], torch.zeros_like(model[weight][0]), model[weight][0]])
    model[bias] = torch.stack([model[bias][1], torch.tensor(-1e4), model[bias][0]])
    classes, names = ["n002_green", "n005_unseen", "n001_red"], ["green thing", "unseen thing", "red thing"]
    other = tmp_path / "other.pt"
    kept = {k: ckpt[k] for k in ("config", "stats")}
    save_checkpoint({**kept, "model": model, "classes": classes, "names": names}, other)
    report = tmp_path / "report"
    args = ["evaluate", "--checkpoint", str(other), "--data", str(data), "--no-progress", "--out", str(report)]
    assert main(args) == 0
    after = capsys.readouterr()
    assert after.err == "" and before.err == ""  # --no-progress: no bar
    top1 = before.out.splitlines()[0].split(", top-5")[0]
    assert after.out.startswith(f"{top1}, top-5 error 0.0000 on 4 images")  # the same predictions; top-3 of 3
    assert (report / "confusion.csv").read_text().startswith("true\\predicted,n002_green,n005_unseen,n001_red")

    shutil.copytree(data, tmp_path / "data")
    write_image(tmp_path / "data" / "val" / "n004_blue" / "0.JPEG")
    assert main(["evaluate", "--checkpoint", str(other), "--data", str(tmp_path / "data")]) == 2
    assert "are not among the model's 3 classes: n004_blue" in capsys.readouterr().err

    prepare_dataset(data, tmp_path / "prepared", workers=0, progress=False)
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(tmp_path / "prepared")]) == 2
    err = capsys.readouterr().err
    assert f"is a prepared dataset; give the image folder it was made from ({data}) with --data" in err


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="watches the process in Linux's /proc")
@pytest.mark.parametrize("signum, said", [(2, "alexnet: interrupted"), (15, "alexnet: stopped by SIGTERM")])
def test_a_signal_while_pytorch_is_imported_stops_in_one_line(signum, said, tmp_path):
    """Ctrl-C in the ~2 s that `import torch` takes printed a traceback; SIGTERM ended the process silently."""
    import os
    import re
    import signal
    import time

    # `info` ends at once once imported: a signal come too late fails the test, and writes nothing
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", "info"], stderr=subprocess.PIPE, cwd=tmp_path)

    def importing_or_ready() -> bool:  # the handlers are set, or PyTorch's libraries are being loaded
        status = Path(f"/proc/{proc.pid}/status").read_text()
        sigterm_caught = int(re.search(r"SigCgt:\s*(\w+)", status)[1], 16) >> (signal.SIGTERM - 1) & 1
        return bool(sigterm_caught) or "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()

    deadline = time.monotonic() + 60
    while not importing_or_ready():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert err.decode().strip().splitlines() == [said]


def test_every_option_of_every_command_says_what_it_does():
    """`alexnet CMD --help` explains each option; a train option shows its default where it has one."""
    import argparse
    import dataclasses

    from alexnet.cli import build_parser
    from alexnet.train.config import TrainConfig

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [
        f"{name} {action.option_strings or action.dest}"
        for name, parser in commands.items()
        for action in parser._actions
        if not action.help
    ]
    assert not silent
    helps = {action.dest: action.help for action in commands["train"]._actions}
    for f in dataclasses.fields(TrainConfig):
        if isinstance(f.default, int | float | str) and not isinstance(f.default, bool):
            assert "default" in helps[f.name] and str(f.default) in helps[f.name], f.name
