"""Small learnable datasets written in the real on-disk layouts, so tests and the quick demo run through
the same loading code (utils/data.py) as CIFAR-100.

Every class has a fixed random smooth colour template (low-frequency sinusoids plus a few colour blobs,
partly shared between classes so they are not trivially apart); an image is its class template shifted by
a few pixels, scaled by a random brightness, plus gaussian noise. A tiny ResNet gets well above chance
in a few epochs, but not 100% at once.

    python -m utils.synthetic ROOT [--layout png|pickle] [--classes N] [--train_per_class N]
                                   [--test_per_class N] [--size S] [--digits]
"""
import argparse
import os
import pickle

import numpy as np
from PIL import Image

SHARED_WEIGHT = 0.5  # share of the template common to all classes: makes classes harder to tell apart
NOISE_STD = 0.15  # pixel noise, in [0, 1] units


def _smooth_pattern(rng, size, num_waves=3, num_blobs=2):
    """One (3, size, size) random smooth colour pattern in [-1, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((3, size, size))
    for ch in range(3):
        for _ in range(num_waves):
            cycles = rng.uniform(0.5, 3.0)
            angle = rng.uniform(0, 2 * np.pi)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * cycles * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
            out[ch] += rng.uniform(0.3, 1.0) * wave
    for _ in range(num_blobs):
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        sigma = rng.uniform(0.08, 0.2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
        out += rng.uniform(-1.5, 1.5, size=(3, 1, 1)) * blob
    return out / np.abs(out).max()


def make_synthetic(num_classes=10, train_per_class=50, test_per_class=20, size=32, seed=0):
    """The images write_synthetic writes: (train_x, train_y, test_x, test_y, class_names), images uint8
    (N, 3, size, size) in a shuffled (class-interleaved) order, labels int64."""
    rng = np.random.default_rng(seed)
    max_shift = max(1, round(3 * size / 32))
    big = size + 2 * max_shift  # templates are drawn larger so that shifted crops never wrap around
    shared = _smooth_pattern(rng, big)
    templates = [SHARED_WEIGHT * shared + (1 - SHARED_WEIGHT) * _smooth_pattern(rng, big)
                 for _ in range(num_classes)]

    def sample(per_class):
        labels = np.repeat(np.arange(num_classes), per_class)
        rng.shuffle(labels)
        images = np.empty((len(labels), 3, size, size), dtype=np.uint8)
        for i, label in enumerate(labels):
            dy, dx = rng.integers(0, 2 * max_shift + 1, size=2)
            crop = templates[label][:, dy:dy + size, dx:dx + size]
            brightness = rng.uniform(0.7, 1.3)
            img = 0.5 + 0.35 * brightness * crop + rng.normal(0, NOISE_STD, crop.shape)
            images[i] = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)

    train_x, train_y = sample(train_per_class)
    test_x, test_y = sample(test_per_class)
    width = max(2, len(str(num_classes - 1)))
    classes = [f"class_{i:0{width}d}" for i in range(num_classes)]
    return train_x, train_y, test_x, test_y, classes


def write_synthetic(root, layout="png", num_classes=10, train_per_class=50, test_per_class=20, size=32,
                    seed=0, img_type="png"):
    """Write make_synthetic(...)'s images under `root`: layout "png" as root/{train,test}/<class>/<i>.<img_type>
    (i = the image's position in make_synthetic's order), layout "pickle" as root/cifar-100-python/ in
    the official format (32x32 only). Returns root."""
    train_x, train_y, test_x, test_y, classes = make_synthetic(
        num_classes, train_per_class, test_per_class, size, seed)
    if layout == "png":
        _write_folders(os.path.join(root, "train"), train_x, train_y, classes, img_type)
        _write_folders(os.path.join(root, "test"), test_x, test_y, classes, img_type)
    elif layout == "pickle":
        if size != 32:
            raise ValueError("the official CIFAR-100 pickle format holds 32x32 images only")
        _write_pickles(os.path.join(root, "cifar-100-python"), train_x, train_y, test_x, test_y, classes)
    else:
        raise ValueError(f"layout must be 'png' or 'pickle', got {layout!r}")
    return root


def _write_folders(split_dir, x, y, classes, img_type="png"):
    width = max(5, len(str(len(x) - 1)))  # zero-padded, so sorted file names keep the written order
    for name in classes:
        os.makedirs(os.path.join(split_dir, name), exist_ok=True)
    save_args = {"compress_level": 1} if img_type == "png" else {"quality": 95, "subsampling": 0}
    for i, (img, label) in enumerate(zip(x, y)):
        path = os.path.join(split_dir, classes[label], f"{i:0{width}d}.{img_type}")
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(path, **save_args)


def _write_pickles(pickle_dir, train_x, train_y, test_x, test_y, classes):
    """The official archive's three files: dicts with bytes keys, written with protocol 2 like the original."""
    os.makedirs(pickle_dir, exist_ok=True)
    num_coarse = max(1, len(classes) // 5)  # CIFAR-100 has 20 superclasses of 5 classes

    def split_dict(x, y, batch_label):
        return {
            b"filenames": [f"{classes[label]}_s_{i:06d}.png".encode() for i, label in enumerate(y)],
            b"batch_label": batch_label.encode(),
            b"fine_labels": [int(label) for label in y],
            b"coarse_labels": [int(label) * num_coarse // len(classes) for label in y],
            b"data": x.reshape(len(x), -1),  # N x 3072, each row the CHW bytes of one image
        }

    files = {
        "train": split_dict(train_x, train_y, "training batch 1 of 1"),
        "test": split_dict(test_x, test_y, "testing batch 1 of 1"),
        "meta": {b"fine_label_names": [name.encode() for name in classes],
                 b"coarse_label_names": [f"superclass_{k}".encode() for k in range(num_coarse)]},
    }
    for name, obj in files.items():
        with open(os.path.join(pickle_dir, name), "wb") as f:
            pickle.dump(obj, f, protocol=2)


def digits_images(size=32, seed=0, hard_fraction=0.0, levels=0, noise=64.0):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as RGB uint8 (N, 3, size, size), their
    labels and each image's difficulty level (N,) (0: as bundled).

    A spread of difficulty (the case per-image routing is for), drawn at random per image with `seed + 1`:
      hard_fraction > 0   two levels: that fraction gets level 1, contrast halved and Gaussian noise of std
                          `noise` (pixel values 0..255) added per pixel and channel
      levels = L >= 2     a graded spread: level l drawn uniformly from 0 .. L - 1, severity s = l / (L - 1),
                          contrast times (1 - s / 2) and noise of std s * noise"""
    from sklearn.datasets import load_digits

    if hard_fraction > 0 and levels:
        raise ValueError("give hard_fraction (two levels) or levels (a graded spread), not both")
    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)  # pixel values are 0..16
    images = np.stack([
        np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR).convert("RGB")).transpose(2, 0, 1)
        for g in grey])
    labels = digits.target.astype(np.int64)
    level = np.zeros(len(labels), dtype=np.int64)
    degrade = np.random.default_rng(seed + 1)
    if hard_fraction > 0:
        hard = degrade.random(len(labels)) < hard_fraction
        noisy = 0.5 * images[hard] + degrade.normal(0.0, noise, images[hard].shape)
        images[hard] = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
        return images, labels, hard.astype(np.int64)
    if levels < 2:
        return images, labels, level
    level = degrade.integers(0, levels, len(labels))
    s = (level / (levels - 1)).reshape(-1, 1, 1, 1)
    noisy = (1 - s / 2) * images + s * degrade.normal(0.0, noise, images.shape)
    images = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return images, labels, level


def _digits_grey(size):
    """scikit-learn's 8x8 digits brought to size x size (bilinear), float in [0, 255], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)  # pixel values are 0..16
    big = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR), dtype=np.float64)
                    for g in grey])
    return big, digits.target.astype(np.int64)


def transformed_digits(size=16, seed=0, levels=5, rotate=40.0, shrink=0.35, shift=0.2, clutter=3):
    """scikit-learn's digits under a graded geometric transformation with clutter, a difficulty that more
    processing can undo (the digit is all there, only moved, turned and crowded, unlike digits_images'
    noise): RGB uint8 (N, 3, size, size), labels, and each image's level (N,).

    Level l is drawn uniformly from 0 .. levels - 1 per image (with `seed + 1`); severity s = l / (levels - 1),
    jittered per image by a factor in [0.75, 1]: the digit is rotated by up to s * `rotate` degrees (either
    way), shrunk by up to s * `shrink` of its size, shifted by up to s * `shift` of the side in a random
    direction, and round(s * `clutter`) distractor strokes (a random third-of-the-side window of another
    digit, at 60-100% intensity) are laid over it (pixel-wise maximum). Level 0 is the digit as bundled."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2 for a graded transformation, got {levels}")
    big, labels = _digits_grey(size)
    rng = np.random.default_rng(seed + 1)
    level = rng.integers(0, levels, len(labels))
    out = np.empty((len(labels), size, size))
    win = max(2, size // 3)
    c = (size - 1) / 2
    for i, img in enumerate(big):
        s = level[i] / (levels - 1) * rng.uniform(0.75, 1.0)
        angle = np.deg2rad(s * rotate * rng.choice((-1.0, 1.0)))
        scale = 1 - s * shrink
        direction = rng.uniform(0, 2 * np.pi)
        dx, dy = s * shift * size * np.cos(direction), s * shift * size * np.sin(direction)
        # PIL's affine maps each output pixel to the input: the inverse of rotate-scale-then-shift about the centre
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        a, b, d, e = cos, sin, -sin, cos
        tx, ty = c + dx, c + dy
        coeffs = (a, b, c - a * tx - b * ty, d, e, c - d * tx - e * ty)
        moved = Image.fromarray(img.astype(np.float32), mode="F").transform(
            (size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0.0)
        canvas = np.asarray(moved, dtype=np.float64)
        for _ in range(int(round(s * clutter))):
            other = big[rng.integers(len(big))]
            y0, x0 = rng.integers(0, size - win + 1, 2)
            y1, x1 = rng.integers(0, size - win + 1, 2)
            patch = other[y0:y0 + win, x0:x0 + win] * rng.uniform(0.6, 1.0)
            canvas[y1:y1 + win, x1:x1 + win] = np.maximum(canvas[y1:y1 + win, x1:x1 + win], patch)
        out[i] = canvas
    grey = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, None], 3, axis=1), labels, level


def write_digits(root, size=32, test_fraction=0.2, seed=0, hard_fraction=0.0, noise=64.0, levels=0):
    """The digits of digits_images as PNGs of size x size in the class-folder layout, with a stratified
    deterministic train/test split. Returns root. With a spread of difficulty, the degraded images' paths,
    relative to root ("test/3/00012.png"), are listed in root/hard.txt (two levels) or with their level in
    root/difficulty.txt ("<path> <level>" per line, graded; evaluation/routes_by_difficulty.py reads either)."""
    images, labels, level = digits_images(size, seed, hard_fraction, levels, noise)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):  # stratified: the same share of every class goes to test
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.extend(idx[:round(len(idx) * test_fraction)])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_idx] = True
    classes = [str(c) for c in range(10)]
    _write_folders(os.path.join(root, "train"), images[~is_test], labels[~is_test], classes)
    _write_folders(os.path.join(root, "test"), images[is_test], labels[is_test], classes)
    listed = []
    for split, part in (("train", ~is_test), ("test", is_test)):
        width = max(5, len(str(part.sum() - 1)))  # _write_folders' names
        listed += [(f"{split}/{classes[labels[j]]}/{i:0{width}d}.png", level[j])
                   for i, j in enumerate(np.flatnonzero(part))]
    if hard_fraction > 0:
        with open(os.path.join(root, "hard.txt"), "w") as f:
            f.write("".join(f"{path}\n" for path, lv in listed if lv))
    elif levels >= 2:
        with open(os.path.join(root, "difficulty.txt"), "w") as f:
            f.write("".join(f"{path} {lv}\n" for path, lv in listed))
    return root


def write_split(root, images, labels, train_idx, test_idx, classes=None):
    """images[train_idx] and images[test_idx] as root/{train,test}/<class>/<index>.png, named by their index
    in `images` (so predictions on the test folder map back to the images: sorted class, then index).
    Returns root."""
    classes = classes or [str(c) for c in range(int(labels.max()) + 1)]
    for split, idx in (("train", train_idx), ("test", test_idx)):
        for name in classes:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
        for j in idx:
            path = os.path.join(root, split, classes[labels[j]], f"{j:05d}.png")
            Image.fromarray(np.ascontiguousarray(images[j].transpose(1, 2, 0))).save(path, compress_level=1)
    return root


def main():
    parser = argparse.ArgumentParser(description="Write a small synthetic dataset in a CIFAR layout.")
    parser.add_argument("root")
    parser.add_argument("--layout", choices=["png", "pickle"], default="png")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train_per_class", type=int, default=50)
    parser.add_argument("--test_per_class", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--img_type", choices=["png", "jpg"], default="png")
    parser.add_argument("--digits", action="store_true", help="scikit-learn's digits instead")
    args = parser.parse_args()
    if args.layout == "pickle" and args.size != 32 and not args.digits:
        parser.error("--layout pickle holds 32x32 images only (the official format); drop --size")
    if args.digits:
        write_digits(args.root, size=args.size, seed=args.seed)
        print(f"wrote scikit-learn digits ({args.size}x{args.size} PNG class folders) to {args.root}")
        return
    write_synthetic(args.root, args.layout, args.classes, args.train_per_class, args.test_per_class,
                    args.size, args.seed, args.img_type)
    print(f"wrote {args.classes} classes x ({args.train_per_class} train + {args.test_per_class} test) "
          f"{args.size}x{args.size} images, layout {args.layout}, to {args.root}")


if __name__ == "__main__":
    main()
