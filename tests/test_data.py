"""utils/data.py and utils/synthetic.py: both on-disk layouts load exactly what was written, errors are one
line that names the problem, and BatchLoader batches are deterministic, sharded and correctly augmented."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import (BatchLoader, DataError, augment, channel_stats, crop_and_flip, load_dataset,
                        split_val)
from utils.synthetic import make_synthetic, write_synthetic

SMALL = dict(num_classes=3, train_per_class=6, test_per_class=4)


def expected(size=32, seed=0, **kw):
    """What write_synthetic writes, as tensors."""
    tx, ty, vx, vy, classes = make_synthetic(**{**SMALL, **kw}, size=size, seed=seed)
    return torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(vx), torch.from_numpy(vy), classes


def class_major(x, y):
    """The folder layout reads class by class, each class in file name (= written) order."""
    order = torch.from_numpy(np.argsort(y.numpy(), kind="stable"))
    return x[order], y[order]


def assert_one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg


# ----------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("num_workers", [0, 2])
def test_folders_load_written_pixels_and_labels(tmp_path, num_workers):
    write_synthetic(tmp_path, "png", **SMALL)
    ds = load_dataset(tmp_path, num_workers=num_workers)
    tx, ty, vx, vy, classes = expected()
    assert ds.layout == "folders" and ds.classes == classes
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    for got_x, got_y, (want_x, want_y) in [(ds.train_x, ds.train_y, class_major(tx, ty)),
                                           (ds.test_x, ds.test_y, class_major(vx, vy))]:
        assert torch.equal(got_x, want_x)  # PNG is lossless
        assert torch.equal(got_y, want_y)


def test_folders_class_index_is_sorted_folder_name(tmp_path):
    colours = {"zebra": (250, 0, 0), "apple": (0, 250, 0), "mango": (0, 0, 250)}
    for split in ("train", "test"):
        for name, rgb in colours.items():
            os.makedirs(tmp_path / split / name)
            Image.new("RGB", (32, 32), rgb).save(tmp_path / split / name / "a.png")
    ds = load_dataset(tmp_path)
    assert ds.classes == ["apple", "mango", "zebra"]
    for img, label in zip(ds.train_x, ds.train_y):
        assert tuple(img[:, 5, 7].tolist()) == colours[ds.classes[label]]


def test_pickle_layout_loads_written_pixels_and_labels(tmp_path):
    write_synthetic(tmp_path, "pickle", **SMALL)
    tx, ty, vx, vy, classes = expected()
    for data_dir in (tmp_path, tmp_path / "cifar-100-python"):  # parent or the pickle folder itself
        ds = load_dataset(data_dir)
        assert ds.layout == "pickle" and ds.classes == classes
        assert torch.equal(ds.train_x, tx) and torch.equal(ds.train_y, ty)
        assert torch.equal(ds.test_x, vx) and torch.equal(ds.test_y, vy)


def test_pickle_rows_are_chw(tmp_path):
    """One hand-made image: channel c holds value 10*c + row, so a wrong reshape shows at once."""
    img = np.stack([np.broadcast_to((10 * c + np.arange(32))[:, None], (32, 32)) for c in range(3)])
    d = tmp_path / "cifar-100-python"
    os.makedirs(d)
    split = {b"data": img.astype(np.uint8).reshape(1, 3072), b"fine_labels": [1]}
    for name, obj in [("train", split), ("test", split), ("meta", {b"fine_label_names": [b"a", b"b"]})]:
        with open(d / name, "wb") as f:
            pickle.dump(obj, f)
    ds = load_dataset(tmp_path)
    assert ds.classes == ["a", "b"] and ds.train_y.tolist() == [1]
    assert ds.train_x[0, 2, 7, 0] == 27 and ds.train_x[0, 0, 31, 5] == 31


def test_jpg_folders(tmp_path):
    write_synthetic(tmp_path, "png", img_type="jpg", **SMALL)
    ds = load_dataset(tmp_path, img_type="jpg")
    tx, ty, _, _, _ = expected()
    want_x, want_y = class_major(tx, ty)
    assert torch.equal(ds.train_y, want_y)
    # lossy (the pixel noise suffers most), but the same images: compare 4x4-pooled versions
    pooled = [torch.nn.functional.avg_pool2d(t.float(), 4) for t in (ds.train_x, want_x)]
    assert (pooled[0] - pooled[1]).abs().mean() < 3


def test_resize(tmp_path):
    write_synthetic(tmp_path / "p", "pickle", **SMALL)
    assert load_dataset(tmp_path / "p", resize=16).train_x.shape[1:] == (3, 16, 16)
    write_synthetic(tmp_path / "f", "png", size=40, **SMALL)
    ds = load_dataset(tmp_path / "f", resize=32)
    assert ds.train_x.shape == (18, 3, 32, 32) and ds.test_x.shape == (12, 3, 32, 32)
    assert load_dataset(tmp_path / "f", resize=40).train_x.shape[1:] == (3, 40, 40)


def test_resize_keeps_a_flat_image_flat(tmp_path):
    write_synthetic(tmp_path, "pickle", **SMALL)
    ds = load_dataset(tmp_path, resize=16)
    small_means = ds.train_x.float().mean(dim=(2, 3))
    full_means = load_dataset(tmp_path).train_x.float().mean(dim=(2, 3))
    assert (small_means - full_means).abs().max() < 2  # antialiased: averages, does not sample


# ------------------------------------------------------------------------------------------ errors

def test_missing_dir(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "nope")
    assert_one_line_error(e, "nope", "does not exist")


def test_empty_dir(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert_one_line_error(e, str(tmp_path), "neither", "cifar-100-python", "--download", "empty")


def test_dir_with_other_stuff(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    os.makedirs(tmp_path / "images")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert_one_line_error(e, "neither", "train/<class>/*.png", "images, notes.txt")


def test_wrong_img_type(tmp_path):
    write_synthetic(tmp_path, "png", **SMALL)
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, img_type="jpg")
    assert_one_line_error(e, "no *.jpg images under", "train", "found other files: .png", "--img_type")


def test_empty_class_folder(tmp_path):
    write_synthetic(tmp_path, "png", **SMALL)
    os.makedirs(tmp_path / "train" / "ghost")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert_one_line_error(e, "ghost", "no *.png images")


def test_corrupt_png(tmp_path):
    write_synthetic(tmp_path, "png", **SMALL)
    bad = tmp_path / "test" / "class_01" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    for workers in (0, 2):
        with pytest.raises(DataError) as e:
            load_dataset(tmp_path, num_workers=workers)
        assert_one_line_error(e, "cannot read image", "zz_broken.png")


def test_mismatched_test_classes(tmp_path):
    write_synthetic(tmp_path, "png", **SMALL)
    os.rename(tmp_path / "test" / "class_02", tmp_path / "test" / "class_99")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert_one_line_error(e, "differ", "class_02", "class_99")


def test_missing_test_folder(tmp_path):
    write_synthetic(tmp_path, "png", **SMALL)
    os.rename(tmp_path / "test", tmp_path / "val")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert_one_line_error(e, "no test/ folder")


def test_malformed_pickles(tmp_path):
    write_synthetic(tmp_path, "pickle", **SMALL)
    d = tmp_path / "cifar-100-python"
    with open(d / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert_one_line_error(e, "train", "3072")
    with open(d / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert_one_line_error(e, "fine_labels")
    (d / "train").write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert_one_line_error(e, "cannot read", "train")
    os.remove(d / "meta")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert_one_line_error(e, "lacks the file 'meta'")


@pytest.mark.parametrize("bad", [0, -3, 2.5, "32"])
def test_bad_resize(tmp_path, bad):
    write_synthetic(tmp_path, "pickle", **SMALL)
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, resize=bad)
    assert_one_line_error(e, "--resize")


def test_data_error_is_a_user_error():
    from utils.errors import UserError
    assert issubclass(DataError, UserError)


# ------------------------------------------------------------------------------------- split, stats

def test_split_val_deterministic_and_disjoint():
    x = torch.arange(100).view(100, 1, 1, 1).to(torch.uint8)
    y = torch.arange(100)
    a = split_val(x, y, 0.1, seed=3)
    b = split_val(x, y, 0.1, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    tr_x, tr_y, va_x, va_y = a
    assert len(va_y) == 10 and len(tr_y) == 90
    assert set(tr_y.tolist()).isdisjoint(va_y.tolist())
    assert sorted(tr_y.tolist() + va_y.tolist()) == list(range(100))
    assert torch.equal(tr_x.flatten().long(), tr_y)  # images stay with their labels
    assert not torch.equal(split_val(x, y, 0.1, seed=4)[3], va_y)
    _, _, empty_x, empty_y = split_val(x, y, 0.0, seed=3)
    assert empty_x.shape == (0, 1, 1, 1) and empty_y.shape == (0,)
    with pytest.raises(DataError):
        split_val(x, y, 1.0, seed=3)


def test_channel_stats_matches_direct_computation():
    x = torch.randint(0, 256, (300, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    x[:, 1] //= 2
    mean, std = channel_stats(x, chunk=64)
    xf = x.double() / 255
    assert torch.allclose(mean.double(), xf.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std.double(), xf.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False), atol=1e-6)


# ------------------------------------------------------------------------------------ augmentation

def test_crop_and_flip_by_hand():
    x = torch.arange(2 * 3 * 5 * 5).view(2, 3, 5, 5).to(torch.uint8)
    centre = torch.tensor([[4, 4], [4, 4]])
    assert torch.equal(crop_and_flip(x, centre, torch.tensor([0, 0])), x)  # no shift, no flip
    assert torch.equal(crop_and_flip(x, centre, torch.tensor([1, 0])), torch.cat([x[:1].flip(3), x[1:]]))
    # image 0 moved by (dy, dx) = (+2, -1): out[i, j] = x[i + 2, j - 1], zero where that falls outside
    out = crop_and_flip(x, torch.tensor([[6, 3], [4, 4]]), torch.tensor([0, 0]))
    want = torch.zeros_like(x[0])
    want[:, :3, 1:] = x[0, :, 2:, :4]
    assert torch.equal(out[0], want) and torch.equal(out[1], x[1])
    # crop then flip: the flipped version of that same window
    flipped = crop_and_flip(x, torch.tensor([[6, 3], [4, 4]]), torch.tensor([1, 0]))
    assert torch.equal(flipped[0], want.flip(2))


def test_augment_shape_dtype_and_generator():
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    out = augment(x, torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, x)
    state = torch.get_rng_state()
    augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never touched


# -------------------------------------------------------------------------------------- BatchLoader

def loader(x, y, bs=8, **kw):
    kw.setdefault("train", True)
    return BatchLoader(x, y, bs, device="cpu", mean=[0.5] * 3, std=[0.25] * 3, **kw)


def data(n=50):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g).to(torch.uint8), torch.arange(n)


def batches(ld, epoch):
    ld.set_epoch(epoch)
    return list(ld)


def test_loader_same_epoch_same_batches_other_epoch_differs():
    x, y = data()
    a = batches(loader(x, y, seed=1), 3)
    b = batches(loader(x, y, seed=1), 3)  # a fresh loader, as after a resume at epoch 3
    assert len(a) == 6 and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b))
    c = batches(loader(x, y, seed=1), 4)
    assert not torch.equal(torch.cat([t[1] for t in a]), torch.cat([t[1] for t in c]))
    d = batches(loader(x, y, seed=2), 3)
    assert not torch.equal(torch.cat([t[1] for t in a]), torch.cat([t[1] for t in d]))


def test_loader_train_ranks_disjoint_and_drop_last():
    x, y = data(50)
    ranks = [loader(x, y, bs=8, rank=r, world_size=2, seed=7) for r in range(2)]
    seen = [torch.cat([t[1] for t in batches(ld, 2)]) for ld in ranks]
    assert [len(ld) for ld in ranks] == [3, 3] and [ld.num_samples for ld in ranks] == [24, 24]
    assert all(len(s) == 24 for s in seen)
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert all(b[0].shape == (8, 3, 8, 8) and b[0].dtype == torch.float32 for b in batches(ranks[0], 2))


def test_loader_eval_shards_cover_every_image_once():
    x, y = data(23)
    for world_size in (1, 2, 3):
        seen = []
        for r in range(world_size):
            ld = loader(x, y, bs=4, train=False, rank=r, world_size=world_size)
            got = batches(ld, 0)
            assert len(got) == len(ld) and sum(len(t[1]) for t in got) == ld.num_samples
            seen += torch.cat([t[1] for t in got]).tolist()
        assert sorted(seen) == list(range(23))


def test_loader_eval_is_unaugmented_and_normalised():
    x, y = data(10)
    (xb, yb), = batches(loader(x, y, bs=16, train=False), 0)
    assert torch.equal(yb, y)
    assert torch.allclose(xb, (x.float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_loader_normalisation_gives_zero_mean_unit_std():
    x = torch.randint(0, 256, (64, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    x[:, 0] //= 4
    mean, std = channel_stats(x)
    xb = torch.cat([b[0] for b in BatchLoader(x, torch.zeros(64), 16, train=False, device="cpu",
                                              mean=mean, std=std)])
    assert xb.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (xb.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_loader_channels_last_and_unaugmented_shuffle():
    x, y = data(32)
    xb, yb = next(iter(loader(x, y, channels_last=True)))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    xb, yb = next(iter(loader(x, y, augment=False)))  # shuffled order, images untouched
    assert torch.allclose(xb, (x[yb].float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_loader_batch_larger_than_data_is_an_error():
    x, y = data(10)
    with pytest.raises(DataError):
        loader(x, y, bs=16)


# ------------------------------------------- images users really have (16-bit, palette, alpha, CMYK ...)

def _folder_of(tmp_path, images, img_type="png", **save):
    """One class folder per split holding `images` (PIL images) as a.<img_type>, b.<img_type>, ..."""
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / "only")
        for i, im in enumerate(images):
            im.save(tmp_path / split / "only" / f"{chr(97 + i)}.{img_type}", **save)
    return tmp_path


def _pixels(tmp_path, img_type="png"):
    return load_dataset(tmp_path, img_type=img_type, resize=8).train_x.permute(0, 2, 3, 1).numpy()


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (PIL mode I;16, values up to 65535) was read as 99.7% white: converted, not clipped."""
    v = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)  # 0 .. 65520
    im = Image.fromarray(v)
    assert im.mode == "I;16"
    got = _pixels(_folder_of(tmp_path, [im]))[0]
    want = np.round(v / 257).astype(np.uint8)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 1], want)
    assert 0 < (got == 255).mean() < 0.05


def test_32bit_integer_in_16bit_range_is_scaled_and_outside_is_refused(tmp_path):
    v = np.arange(64, dtype=np.int32).reshape(8, 8) * 1000
    got = _pixels(_folder_of(tmp_path / "ok", [Image.fromarray(v)], img_type="tiff"), "tiff")[0]
    assert np.array_equal(got[..., 2], np.round(v / 257).astype(np.uint8))
    _folder_of(tmp_path / "bad", [Image.fromarray(v * 100)], img_type="tiff")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "bad", img_type="tiff", resize=8)
    assert_one_line_error(e, "a.tiff", "16-bit")


def test_float_pixels_are_refused_naming_the_file(tmp_path):
    _folder_of(tmp_path, [Image.fromarray(np.full((8, 8), 0.5, np.float32))], img_type="tiff")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, img_type="tiff", resize=8)
    assert_one_line_error(e, "a.tiff", "floating-point")


def test_alpha_is_composited_on_black_for_every_alpha_mode(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[...] = (200, 100, 50)
    alpha = np.tile(np.array([0, 128, 255, 255, 64, 0, 255, 32], np.uint8), (8, 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    la = Image.fromarray(np.dstack([rgb[..., 0], alpha]))
    pal = Image.fromarray(rgb).quantize(4)  # palette with one transparent entry
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])
    got = _pixels(_folder_of(tmp_path, [rgba, la, pal]))
    a = alpha[..., None].astype(np.float64) / 255
    assert np.abs(got[0].astype(int) - np.round(rgb * a)).max() <= 1
    assert np.abs(got[1].astype(int) - np.round(rgb[..., :1] * a)).max() <= 1
    assert (got[2] == 0).all()  # every pixel holds the transparent palette entry: all background


def test_palette_grey_bilevel_cmyk_jpeg_decode_to_their_rgb(tmp_path):
    i, j = np.mgrid[0:8, 0:8]
    rgb = Image.fromarray(np.dstack([i * 30, j * 30, 200 - (i + j) * 10]).astype(np.uint8))  # smooth: JPEG-friendly
    pal = rgb.quantize(16)
    grey = rgb.convert("L")
    bilevel = grey.convert("1")
    cmyk = rgb.convert("CMYK")
    got = _pixels(_folder_of(tmp_path / "png", [pal, grey, bilevel]))
    assert np.array_equal(got[0], np.asarray(pal.convert("RGB")))
    assert np.array_equal(got[1], np.repeat(np.asarray(grey)[..., None], 3, 2))
    assert set(np.unique(got[2])) <= {0, 255}
    got = _pixels(_folder_of(tmp_path / "jpg", [cmyk, rgb], "jpg", quality=95, subsampling=0), "jpg")
    assert np.abs(got[0].astype(int) - np.asarray(rgb)).mean() < 6  # lossy, but the same picture
    assert np.abs(got[1].astype(int) - np.asarray(rgb)).mean() < 6


def test_constant_channel_keeps_the_input_finite():
    """A channel that never varies (std 0) used to give inf scale and NaN input ('loss became nan')."""
    x = torch.randint(0, 256, (20, 3, 4, 4), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    x[:, 0] = 0
    mean, std = channel_stats(x)
    assert std[0] > 0
    xb = torch.cat([b[0] for b in BatchLoader(x, torch.zeros(20), 8, train=True, device="cpu", mean=mean,
                                              std=std)])
    assert torch.isfinite(xb).all()
    with pytest.raises(DataError):
        BatchLoader(x, torch.zeros(20), 8, train=True, device="cpu", mean=mean, std=[0.0, 1.0, 1.0])


# -------------------------------------------------------------------------------- augmentation choice

def test_augment_modes_crop_never_flips_none_is_identity():
    x, y = data(32)
    for epoch in range(3):
        cifar, crop, none = (batches(loader(x, y, bs=32, seed=3, augment=a), epoch)[0] for a in
                             ("cifar", "crop", "none"))
        assert torch.equal(cifar[1], crop[1]) and torch.equal(crop[1], none[1])  # same order
        # crop = cifar's crops without its flips: the same draws, flips ignored
        offsets = torch.randint(0, 9, (32, 2), generator=__import__("utils.data").data._seeded_generator(3, epoch, 0, 1))
        raw = x[crop[1]]
        assert torch.allclose(crop[0], (crop_and_flip(raw, offsets, torch.zeros(32, dtype=torch.long)).float()
                                        / 255 - 0.5) / 0.25, atol=1e-5)
        assert torch.allclose(none[0], (raw.float() / 255 - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(DataError):
        loader(x, y, augment="flip")
