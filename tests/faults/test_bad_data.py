"""Every kind of bad file a real dataset holds is either read correctly or skipped and listed, and the
run goes on. As root, runs without the capabilities that let root read unreadable files.
Elsewhere: a train/val class mismatch and empty folders (tests/test_data.py), most files bad
(tests/test_train.py), bad files in alexnet prepare (tests/test_prepare.py)."""

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_dataset
from PIL import Image

from .conftest import TINY, alexnet_process, cli_args

NOBODY = 65534


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: the shape of a decompression bomb, without the memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def add_bad_and_odd_files(folder: Path) -> tuple[set[bytes], set[bytes]]:
    """Files of every kind in one class folder: returns (paths that must be skipped, paths read correctly)."""
    good_jpeg = next(folder.glob("*.JPEG")).read_bytes()
    bad = {}
    bad["corrupt.JPEG"] = good_jpeg[:20] + bytes(range(256)) * 4
    bad["truncated.JPEG"] = good_jpeg[: len(good_jpeg) // 3]
    bad["zero-byte.JPEG"] = b""
    bad["not-an-image.JPEG"] = b"name,size\nphoto,12\n"
    bad["bomb.png"] = png_header_only(40_000, 40_000)
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    grey = np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)
    Image.fromarray(grey).save(folder / "grey.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen-bit.png")
    Image.fromarray(grey).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(grey).convert("CMYK").save(folder / "cmyk.jpg")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one-pixel.png")
    odd_names = ["grey.png", "sixteen-bit.png", "rgba.png", "cmyk.jpg", "one-pixel.png"]
    # a name that is not UTF-8, once for a good image and once for a broken one
    raw = os.fsencode(folder)
    with open(raw + b"/caf\xe9-good.JPEG", "wb") as f:
        f.write(good_jpeg)
    with open(raw + b"/caf\xe9-broken.JPEG", "wb") as f:
        f.write(b"\xff\xd8 broken")
    os.symlink("loop.JPEG", folder / "loop.JPEG")  # a symlink to itself
    os.symlink("..", folder / "parent")  # a directory loop: not followed
    (folder / "unreadable.JPEG").write_bytes(good_jpeg)
    os.chmod(folder / "unreadable.JPEG", 0)
    skipped = {os.fsencode(folder / n) for n in [*bad, "loop.JPEG", "unreadable.JPEG"]} | {
        raw + b"/caf\xe9-broken.JPEG"
    }
    read = {os.fsencode(folder / n) for n in odd_names} | {raw + b"/caf\xe9-good.JPEG"}
    return skipped, read


def without_root_file_access() -> tuple[str, ...]:
    """A command prefix under which file permissions apply even to root."""
    if os.geteuid() != 0:
        return ()
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: unreadable files cannot be made")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")


def test_every_kind_of_bad_file_is_read_or_skipped_and_listed(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    (data / "train" / "n004_empty").mkdir()  # an empty class folder (in val too: the classes match)
    (data / "val" / "n004_empty").mkdir()
    skipped, read = add_bad_and_odd_files(data / "train" / "n001_red")
    run_dir = tmp_path / "run"
    args = cli_args(data, run_dir, **{**TINY, "epochs": 1})
    proc = alexnet_process(args, prefix=without_root_file_access())
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "warning: class folder n004_empty" in out
    listed = dict(line.split(b"\t", 1) for line in (run_dir / "bad_files.txt").read_bytes().splitlines())
    assert set(listed) == skipped
    assert not read & set(listed)
    reasons = {Path(os.fsdecode(k)).name: v.decode(errors="replace") for k, v in listed.items()}
    assert reasons["bomb.png"].startswith("DecompressionBombError")
    assert reasons["unreadable.JPEG"].startswith("PermissionError")
    assert "Too many levels of symbolic links" in reasons["loop.JPEG"]
    assert (run_dir / "eval.json").is_file()
