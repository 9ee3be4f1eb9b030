"""Tests of lowbitsr.data: image I/O, paired datasets, the bundled set and build_dataset."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from lowbitsr.data import (
    BUNDLED_SPLITS,
    DATASET_TYPES,
    BenchmarkDataset,
    BundledDataset,
    DIV2KDataset,
    ImageFolderDataset,
    build_dataset,
    bundled_image_paths,
    image_to_tensor,
    read_image,
    tensor_to_image,
    write_image,
)
from lowbitsr.errors import ConfigError, DatasetError, ImageError
from lowbitsr.imresize import imresize


def noise_image(seed: int, h: int, w: int) -> np.ndarray:
    """uint8 RGB noise: every patch is unique, so crops can be located unambiguously."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG file whose IHDR claims ``width x height`` RGB pixels (no real pixel data)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def as_hwc(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) float32 tensor with integer values -> uint8 H x W x 3 (checks integrality)."""
    assert t.dtype == torch.float32
    assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= 255
    return t.permute(1, 2, 0).numpy().astype(np.uint8)


def find_patch(full: np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    """All top-left positions where ``patch`` occurs in ``full``."""
    ph, pw = patch.shape[:2]
    cands = np.argwhere(
        (full[: full.shape[0] - ph + 1, : full.shape[1] - pw + 1] == patch[0, 0]).all(-1)
    )
    return [
        (int(y), int(x)) for y, x in cands if np.array_equal(full[y : y + ph, x : x + pw], patch)
    ]


# The 8 dihedral transforms as (hflip, vflip, transpose) applied in that order, and their inverse.
def apply_t(img: np.ndarray, t: tuple[bool, bool, bool]) -> np.ndarray:
    h, v, tr = t
    if h:
        img = img[:, ::-1]
    if v:
        img = img[::-1]
    if tr:
        img = img.swapaxes(0, 1)
    return img


def invert_t(img: np.ndarray, t: tuple[bool, bool, bool]) -> np.ndarray:
    h, v, tr = t
    if tr:
        img = img.swapaxes(0, 1)
    if v:
        img = img[::-1]
    if h:
        img = img[:, ::-1]
    return img


TRANSFORMS = [(h, v, t) for h in (False, True) for v in (False, True) for t in (False, True)]


def locate_pair(
    full_lr: np.ndarray, full_hr: np.ndarray, lr: np.ndarray, hr: np.ndarray, scale: int
) -> tuple[tuple[bool, bool, bool], int, int]:
    """Find the transform and LR position such that (lr, hr) are the same aligned crop of both."""
    found = []
    for t in TRANSFORMS:
        lr0, hr0 = invert_t(lr, t), invert_t(hr, t)
        for y, x in find_patch(full_hr, hr0):
            if y % scale or x % scale:
                continue
            ly, lx = y // scale, x // scale
            if np.array_equal(full_lr[ly : ly + lr0.shape[0], lx : lx + lr0.shape[1]], lr0):
                found.append((t, ly, lx))
    assert found, "LR and HR crops are not an aligned pair under one common transform"
    return found[0]


# --------------------------------------------------------------------------------------- io


def test_write_read_roundtrip_png(tmp_path: Path) -> None:
    img = noise_image(0, 9, 13)
    out = write_image(tmp_path / "a" / "b" / "x.png", img)  # parent dirs created
    assert out == tmp_path / "a" / "b" / "x.png"
    back = read_image(out)
    assert back.dtype == np.uint8 and back.shape == (9, 13, 3)
    np.testing.assert_array_equal(back, img)
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]  # no temp file left behind

    # overwrite in place with a float image: rounded and clipped
    f = img.astype(np.float64)
    f[0, 0] = [-5.0, 300.0, 7.4]
    write_image(out, f)
    back = read_image(out)
    np.testing.assert_array_equal(back[0, 0], [0, 255, 7])
    np.testing.assert_array_equal(back[1:], img[1:])


def test_write_jpeg_and_bad_suffix(tmp_path: Path) -> None:
    img = np.full((16, 16, 3), (200, 40, 90), dtype=np.uint8)
    write_image(tmp_path / "x.jpg", img)
    with Image.open(tmp_path / "x.jpg") as im:
        assert im.format == "JPEG"
    assert np.abs(read_image(tmp_path / "x.jpg").astype(int) - img).max() <= 3
    with pytest.raises(ImageError, match=r"y\.gifx"):
        write_image(tmp_path / "y.gifx", img)
    with pytest.raises(ValueError):
        write_image(tmp_path / "z.png", np.zeros((4, 4), np.uint8))


def test_tensor_image_roundtrip() -> None:
    img = noise_image(1, 5, 7)
    t = image_to_tensor(img)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert t[:, 2, 3].tolist() == img[2, 3].tolist()
    np.testing.assert_array_equal(tensor_to_image(t), img)
    np.testing.assert_array_equal(tensor_to_image(t[None] + 0.3), img)  # batched, rounded
    assert tensor_to_image(torch.full((1, 3, 2, 2), 300.0)).max() == 255
    with pytest.raises(ValueError):
        tensor_to_image(torch.zeros(2, 3, 4, 4))


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nothere\.png.*not found"):
        read_image(tmp_path / "nothere.png")


def test_read_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "random.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match=r"random\.png"):
        read_image(path)


def test_read_truncated_png(tmp_path: Path) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = png_bytes(noise_image(2, 64, 64))
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"half\.png.*truncated"):
        read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        (50_000, 50_000, r"2500000000 pixels.*decompression bomb"),  # Pillow's hard limit
        (12_000, 9_000, r"12000x9000 = 108000000 pixels, more than max_pixels=100000000"),
    ],
)
def test_huge_header_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: int, height: int, message: str
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header(width, height))
    assert path.stat().st_size < 100
    decoded: list[bool] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(True))
    with pytest.raises(ImageError, match=r"bomb\.png.*" + message):
        read_image(path)
    assert not decoded


def test_max_pixels_option(tmp_path: Path) -> None:
    path = save_png(tmp_path / "small.png", noise_image(3, 10, 20))
    with pytest.raises(ImageError, match=r"small\.png.*20x10 = 200 pixels"):
        read_image(path, max_pixels=199)
    assert read_image(path, max_pixels=200).shape == (10, 20, 3)


def test_greyscale_refused_unless_convert(tmp_path: Path) -> None:
    grey = noise_image(4, 6, 8)[..., 0]
    path = save_png(tmp_path / "grey.png", grey)
    with pytest.raises(ImageError, match=r"grey\.png.*greyscale \(mode L\).*convert=True"):
        read_image(path)
    rgb = read_image(path, convert=True)
    assert rgb.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], grey)


def test_bilevel_and_grey_palette_refused(tmp_path: Path) -> None:
    bw = Image.fromarray(noise_image(5, 8, 8)[..., 0] > 127)  # mode "1"
    bw.save(tmp_path / "bw.png")
    with pytest.raises(ImageError, match=r"bw\.png.*greyscale"):
        read_image(tmp_path / "bw.png")
    assert set(np.unique(read_image(tmp_path / "bw.png", convert=True))) <= {0, 255}

    pal = Image.fromarray(noise_image(6, 8, 8)[..., 0]).convert("P")  # grey palette
    assert pal.mode == "P"
    pal.save(tmp_path / "greypal.png")
    with pytest.raises(ImageError, match=r"greypal\.png.*greyscale \(mode palette"):
        read_image(tmp_path / "greypal.png")


def test_colour_palette_loads_silently(tmp_path: Path) -> None:
    img = np.zeros((6, 6, 3), np.uint8)
    img[:3] = (255, 0, 0)
    img[3:] = (0, 0, 255)
    Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(
        tmp_path / "pal.png"
    )
    with Image.open(tmp_path / "pal.png") as im:
        assert im.mode == "P"
    np.testing.assert_array_equal(read_image(tmp_path / "pal.png"), img)


def test_16bit_grey_refused_unless_convert(tmp_path: Path) -> None:
    values = np.array([[0, 257, 65535], [1000, 30000, 128]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with pytest.raises(ImageError, match=r"deep\.png.*16-bit.*convert=True"):
        read_image(tmp_path / "deep.png")
    rgb = read_image(tmp_path / "deep.png", convert=True)
    np.testing.assert_array_equal(rgb[..., 1], np.round(values / 257).astype(np.uint8))


def test_rgba_with_transparency(tmp_path: Path) -> None:
    rgba = np.concatenate([noise_image(7, 5, 5), np.full((5, 5, 1), 255, np.uint8)], axis=2)
    save_png(tmp_path / "opaque.png", rgba)
    # A fully opaque alpha channel is dropped silently: nothing is lost.
    np.testing.assert_array_equal(read_image(tmp_path / "opaque.png"), rgba[..., :3])

    rgba[2, 2, 3] = 10
    save_png(tmp_path / "alpha.png", rgba)
    with pytest.raises(ImageError, match=r"alpha\.png.*alpha channel, mode RGBA.*convert=True"):
        read_image(tmp_path / "alpha.png")
    np.testing.assert_array_equal(read_image(tmp_path / "alpha.png", convert=True), rgba[..., :3])

    la = np.stack([rgba[..., 0], rgba[..., 3]], axis=2)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    with pytest.raises(ImageError, match=r"la\.png.*greyscale.*transparent"):
        read_image(tmp_path / "la.png")


# --------------------------------------------------------------------------------- datasets


@pytest.fixture
def noise_folder(tmp_path: Path) -> Path:
    """Two noise HR images whose sizes are not multiples of 2 or 3."""
    folder = tmp_path / "hr"
    save_png(folder / "a.png", noise_image(10, 41, 50))
    save_png(folder / "b.png", noise_image(11, 38, 47))
    return folder


def test_folder_train_crop_is_aligned(noise_folder: Path) -> None:
    scale, patch = 2, 8
    ds = ImageFolderDataset(noise_folder, scale, lr_patch=patch, augment=False, repeat=3, seed=5)
    assert len(ds) == 6 and ds.names == ["a", "b"]
    for index in range(len(ds)):
        item = ds[index]
        assert item["name"] == ["a", "b"][index % 2]
        assert item["lr"].shape == (3, patch, patch)
        assert item["hr"].shape == (3, patch * scale, patch * scale)
        hr_full = read_image(noise_folder / f"{item['name']}.png")
        hr_full = hr_full[: hr_full.shape[0] // 2 * 2, : hr_full.shape[1] // 2 * 2]
        lr_full = imresize(hr_full, 1 / scale)
        t, _, _ = locate_pair(lr_full, hr_full, as_hwc(item["lr"]), as_hwc(item["hr"]), scale)
        assert t == (False, False, False)
    # different indices of the same image give different crops
    crops = {tuple(ds[i]["lr"][:, 0, 0].tolist()) for i in (0, 2, 4)}
    assert len(crops) > 1


def test_flips_and_transpose_applied_to_both(noise_folder: Path) -> None:
    scale, patch = 3, 6
    ds = ImageFolderDataset(noise_folder, scale, lr_patch=patch, repeat=24, seed=1)
    hr_full = read_image(noise_folder / "a.png")[:39, :48]
    lr_full = imresize(hr_full, output_shape=(13, 16))
    seen = set()
    for index in range(0, len(ds), 2):  # even indices: image "a"
        item = ds[index]
        t, _, _ = locate_pair(lr_full, hr_full, as_hwc(item["lr"]), as_hwc(item["hr"]), scale)
        seen.add(t)
    assert len(seen) >= 6  # 24 draws over 8 equally likely transforms
    assert (False, False, False) in seen


def test_same_seed_same_data_and_epochs_differ(noise_folder: Path) -> None:
    def items(ds: ImageFolderDataset) -> list[torch.Tensor]:
        return [ds[i]["hr"] for i in range(len(ds))]

    a = ImageFolderDataset(noise_folder, 2, lr_patch=8, repeat=4, seed=3)
    b = ImageFolderDataset(noise_folder, 2, lr_patch=8, repeat=4, seed=3, cache=False)
    c = ImageFolderDataset(noise_folder, 2, lr_patch=8, repeat=4, seed=4)
    ia, ib, ic = items(a), items(b), items(c)
    assert all(torch.equal(x, y) for x, y in zip(ia, ib, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(ia, ic, strict=True))
    a.set_epoch(1)
    assert a.epoch == 1
    assert not all(torch.equal(x, y) for x, y in zip(ia, items(a), strict=True))
    a.set_epoch(0)
    assert all(torch.equal(x, y) for x, y in zip(ia, items(a), strict=True))


def test_dataloader_workers_match_main_process(noise_folder: Path) -> None:
    ds = ImageFolderDataset(noise_folder, 2, lr_patch=8, repeat=4, seed=9)
    main = [ds[i]["lr"] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True)
    got = torch.cat([b["lr"] for b in loader])
    assert torch.equal(got, torch.stack(main))
    # set_epoch reaches persistent workers through shared memory
    ds.set_epoch(2)
    epoch2 = torch.cat([b["lr"] for b in loader])
    ds2 = ImageFolderDataset(noise_folder, 2, lr_patch=8, repeat=4, seed=9)
    ds2.set_epoch(2)
    assert torch.equal(epoch2, torch.stack([ds2[i]["lr"] for i in range(len(ds2))]))
    assert not torch.equal(epoch2, got)


def test_eval_mode_whole_image(noise_folder: Path) -> None:
    ds = ImageFolderDataset(noise_folder, 3, mode="eval", repeat=5)
    assert len(ds) == 2  # repeat only applies in train mode
    item = ds[1]  # b.png is 38 x 47 -> HR 36 x 45, LR 12 x 15
    assert item["lr"].shape == (3, 12, 15) and item["hr"].shape == (3, 36, 45)
    hr = read_image(noise_folder / "b.png")[:36, :45]
    np.testing.assert_array_equal(as_hwc(item["hr"]), hr)
    np.testing.assert_array_equal(as_hwc(item["lr"]), imresize(hr, 1 / 3))
    with pytest.raises(IndexError):
        ds[2]


def test_folder_recursive_and_hidden(tmp_path: Path) -> None:
    save_png(tmp_path / "top.PNG", noise_image(0, 8, 8))
    save_png(tmp_path / "sub" / "deep.jpg", noise_image(1, 8, 8))
    (tmp_path / "._top.png").write_bytes(b"not an image")  # macOS resource fork
    (tmp_path / "notes.txt").write_text("hi")
    assert ImageFolderDataset(tmp_path, 2, mode="eval").names == ["top"]
    assert ImageFolderDataset(tmp_path, 2, mode="eval", recursive=True).names == ["sub/deep", "top"]


def make_div2k(root: Path, scale: int, numbers: range, with_lr: bool, split: str = "train") -> None:
    for n in numbers:
        hr = noise_image(n, 20 * scale + 1, 24 * scale)  # one extra HR row, cropped away
        save_png(root / f"DIV2K_{split}_HR" / f"{n:04d}.png", hr)
        if with_lr:
            lr = imresize(hr[: 20 * scale], 1 / scale)
            save_png(root / f"DIV2K_{split}_LR_bicubic" / f"X{scale}" / f"{n:04d}x{scale}.png", lr)


def test_div2k_layout_with_lr_files(tmp_path: Path) -> None:
    make_div2k(tmp_path, 2, range(1, 5), with_lr=True)
    # mark one LR file so we can tell it is read from disk, not recomputed
    lr_path = tmp_path / "DIV2K_train_LR_bicubic" / "X2" / "0003x2.png"
    marked = read_image(lr_path)
    marked[0, 0] = (1, 2, 3)
    write_image(lr_path, marked)
    ds = DIV2KDataset(tmp_path, 2, index_range=(2, 3))
    assert ds.mode == "train" and ds.names == ["0002", "0003"]
    ev = DIV2KDataset(tmp_path, 2, index_range=[2, 3], mode="eval")
    item = ev[1]
    assert item["name"] == "0003"
    assert item["lr"].shape == (3, 20, 24) and item["hr"].shape == (3, 40, 48)
    np.testing.assert_array_equal(as_hwc(item["lr"]), marked)
    np.testing.assert_array_equal(as_hwc(item["hr"]), noise_image(3, 41, 48)[:40])
    crop = DIV2KDataset(tmp_path, 2, index_range=(2, 3), lr_patch=8)[1]
    assert crop["name"] == "0003"
    assert crop["lr"].shape == (3, 8, 8) and crop["hr"].shape == (3, 16, 16)


def test_div2k_lr_made_on_the_fly_and_valid_split(tmp_path: Path) -> None:
    make_div2k(tmp_path, 3, range(801, 803), with_lr=False, split="valid")
    with pytest.raises(DatasetError, match=r"0803\.png"):
        DIV2KDataset(tmp_path, 3, split="valid")  # default range 801-900
    ds = DIV2KDataset(tmp_path, 3, split="valid", index_range=(801, 802))
    assert ds.mode == "eval" and ds.index_range == (801, 802)
    item = ds[0]
    hr = noise_image(801, 61, 72)[:60]
    np.testing.assert_array_equal(as_hwc(item["hr"]), hr)
    np.testing.assert_array_equal(as_hwc(item["lr"]), imresize(hr, 1 / 3))


def test_div2k_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"DIV2K_train_HR.*expected the DIV2K layout"):
        DIV2KDataset(tmp_path, 2)
    make_div2k(tmp_path, 2, range(1, 3), with_lr=True)
    with pytest.raises(DatasetError, match=r"0003\.png.*missing DIV2K image 3"):
        DIV2KDataset(tmp_path, 2, index_range=(1, 3))
    with pytest.raises(ConfigError, match=r"outside split 'train'"):
        DIV2KDataset(tmp_path, 2, index_range=(801, 810))
    with pytest.raises(ConfigError, match=r"split 'test'"):
        DIV2KDataset(tmp_path, 2, split="test")
    (tmp_path / "DIV2K_train_LR_bicubic" / "X2" / "0002x2.png").unlink()
    with pytest.raises(DatasetError, match=r"0002x2\.png.*missing LR image"):
        DIV2KDataset(tmp_path, 2, index_range=(1, 2))


def make_benchmark(root: Path, name: str, scale: int, stems: list[str], with_lr: bool) -> None:
    for i, stem in enumerate(stems):
        hr = noise_image(100 + i, 12 * scale, 10 * scale + 1)
        save_png(root / name / "HR" / f"{stem}.png", hr)
        if with_lr:
            lr = imresize(hr[:, : 10 * scale], 1 / scale)
            save_png(root / name / "LR_bicubic" / f"X{scale}" / f"{stem}x{scale}.png", lr)


def test_benchmark_layout(tmp_path: Path) -> None:
    make_benchmark(tmp_path, "Set5", 4, ["bird", "baby"], with_lr=True)
    ds = BenchmarkDataset(tmp_path, "Set5", 4)
    assert ds.mode == "eval" and len(ds) == 2 and ds.names == ["baby", "bird"]
    item = ds[0]
    assert item["lr"].shape == (3, 12, 10) and item["hr"].shape == (3, 48, 40)
    hr = noise_image(101, 48, 41)[:, :40]
    np.testing.assert_array_equal(as_hwc(item["hr"]), hr)
    np.testing.assert_array_equal(as_hwc(item["lr"]), imresize(hr, 1 / 4))
    # scale 2 has no LR folder: made on the fly
    item2 = BenchmarkDataset(tmp_path, "Set5", 2)[0]
    assert item2["lr"].shape == (3, 24, 20) and item2["hr"].shape == (3, 48, 40)


def test_benchmark_errors(tmp_path: Path) -> None:
    make_benchmark(tmp_path, "Set5", 2, ["a"], with_lr=True)
    with pytest.raises(DatasetError, match=r"Set14.*not found.*available: Set5"):
        BenchmarkDataset(tmp_path, "Set14", 2)
    # an LR file of the wrong size for the scale
    save_png(tmp_path / "Set5" / "LR_bicubic" / "X2" / "ax2.png", noise_image(0, 10, 10))
    ds = BenchmarkDataset(tmp_path, "Set5", 2)
    with pytest.raises(DatasetError, match=r"ax2\.png.*HR[/\\]a\.png"):
        ds[0]
    (tmp_path / "Empty" / "HR").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"Empty.*HR.*no images matching \*\.png"):
        BenchmarkDataset(tmp_path, "Empty", 2)


def test_image_smaller_than_crop(noise_folder: Path) -> None:
    ds = ImageFolderDataset(noise_folder, 2, lr_patch=20)
    assert ds[0]["lr"].shape == (3, 20, 20)  # a.png -> LR 25 x 20 fits exactly
    with pytest.raises(DatasetError, match=r"b\.png.*23x19 pixels.*20x20 LR pixels \(40x40 HR\)"):
        ds[1]  # b.png -> LR 23 x 19


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere.*folder not found"):
        ImageFolderDataset(tmp_path / "nowhere", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*no images matching \*\.png"):
        ImageFolderDataset(tmp_path / "empty", 2)
    with pytest.raises(DatasetError, match=r"gone\.png"):
        ImageFolderDataset(tmp_path / "empty", 2, files=["gone.png"])


def test_corrupt_image_in_dataset_names_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    ds = ImageFolderDataset(tmp_path, 2, mode="eval")
    with pytest.raises(ImageError, match=r"bad\.png"):
        ds[0]


# --------------------------------------------------------------------------------- bundled


def test_bundled_splits_disjoint_and_present() -> None:
    names = [n for split in BUNDLED_SPLITS.values() for n in split]
    assert len(names) == len(set(names)) == 9
    assert set(BUNDLED_SPLITS) == {"train", "valid", "test"}
    assert {"motorcycle_left.png", "motorcycle_right.png"} <= set(BUNDLED_SPLITS["train"])
    for split in BUNDLED_SPLITS:
        assert all(p.is_file() for p in bundled_image_paths(split))


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_bundled_split_loads(split: str) -> None:
    ds = BundledDataset(split, 4, mode="eval")
    assert ds.names == [Path(n).stem for n in BUNDLED_SPLITS[split]]
    for i in range(len(ds)):
        item = ds[i]
        _, h, w = item["lr"].shape
        assert item["hr"].shape == (3, 4 * h, 4 * w)
        assert (4 * h) % 12 == 0 and (4 * w) % 12 == 0


def test_bundled_same_hr_for_all_scales() -> None:
    hrs = [BundledDataset("valid", s, mode="eval")[0]["hr"] for s in (2, 3, 4)]
    assert hrs[0].shape == (3, 504, 504)
    assert torch.equal(hrs[0], hrs[1]) and torch.equal(hrs[1], hrs[2])


def test_bundled_train_crop_alignment() -> None:
    ds = BundledDataset("valid", 4, mode="train", lr_patch=16, repeat=3, seed=2)
    assert len(ds) == 3
    hr_full = read_image(bundled_image_paths("valid")[0])[:504, :504]
    lr_full = imresize(hr_full, 1 / 4)
    for i in range(3):
        item = ds[i]
        assert item["lr"].shape == (3, 16, 16) and item["hr"].shape == (3, 64, 64)
        locate_pair(lr_full, hr_full, as_hwc(item["lr"]), as_hwc(item["hr"]), 4)


def test_bundled_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbitsr.data.bundled as bundled

    monkeypatch.setattr(bundled, "bundled_data_dir", lambda: tmp_path)
    with pytest.raises(DatasetError, match=r"ihc\.png.*reinstall scikit-image"):
        BundledDataset("valid", 4)
    with pytest.raises(ConfigError, match=r"split 'val'.*train, valid, test"):
        bundled_image_paths("val")


# --------------------------------------------------------------------------- build_dataset


def test_build_dataset_types(tmp_path: Path, noise_folder: Path) -> None:
    assert set(DATASET_TYPES) == {"bundled", "div2k", "benchmark", "folder"}
    ds = build_dataset(
        {"type": "bundled", "split": "test", "lr_patch": 32, "repeat": 10}, 4, "train"
    )
    assert isinstance(ds, BundledDataset) and len(ds) == 20 and ds[0]["lr"].shape == (3, 32, 32)

    make_div2k(tmp_path / "div2k", 2, range(1, 3), with_lr=False)
    ds = build_dataset(
        {"type": "div2k", "root": str(tmp_path / "div2k"), "index_range": [1, 2]}, 2, "eval"
    )
    assert isinstance(ds, DIV2KDataset) and ds.names == ["0001", "0002"] and ds.mode == "eval"

    make_benchmark(tmp_path / "bench", "Set5", 2, ["x"], with_lr=False)
    ds = build_dataset(
        {"type": "benchmark", "root": str(tmp_path / "bench"), "name": "Set5"}, 2, "eval"
    )
    assert isinstance(ds, BenchmarkDataset) and ds.names == ["x"]

    ds = build_dataset({"type": "folder", "root": str(noise_folder), "seed": 1}, 2, "train")
    assert isinstance(ds, ImageFolderDataset) and ds.mode == "train" and ds.seed == 1


def test_build_dataset_errors(noise_folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset type 'imagenet'.*bundled, div2k"):
        build_dataset({"type": "imagenet"}, 2, "train")
    with pytest.raises(ConfigError, match=r"no 'type' key"):
        build_dataset({"root": "x"}, 2, "train")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'lr_pach'.*valid keys: .*lr_patch"):
        build_dataset({"type": "folder", "root": str(noise_folder), "lr_pach": 8}, 2, "train")
    with pytest.raises(ConfigError, match=r"needs key\(s\) 'root'"):
        build_dataset({"type": "folder"}, 2, "train")
    with pytest.raises(ConfigError, match=r"augment"):
        build_dataset({"type": "folder", "root": str(noise_folder), "augment": "yes"}, 2, "train")
    with pytest.raises(ConfigError, match=r"lr_patch=0"):
        build_dataset({"type": "folder", "root": str(noise_folder), "lr_patch": 0}, 2, "train")
    with pytest.raises(ConfigError, match=r"mode 'test'"):
        build_dataset({"type": "folder", "root": str(noise_folder)}, 2, "test")
