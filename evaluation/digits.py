"""scikit-learn's bundled digits (1,797 real 8x8 images of 10 classes) as the evaluation's datasets, written
in the class-folder layout the stages read: plain, with a spread of difficulty (noise and lost contrast), or
under a graded geometric transformation; and any split of them by image index (the cross-fitting's folds).

    python -m evaluation.digits ROOT [--size S] [--seed N]
"""
import argparse
import os

import numpy as np
from PIL import Image

from utils.synthetic import write_folders


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
    write_folders(os.path.join(root, "train"), images[~is_test], labels[~is_test], classes)
    write_folders(os.path.join(root, "test"), images[is_test], labels[is_test], classes)
    listed = []
    for split, part in (("train", ~is_test), ("test", is_test)):
        width = max(5, len(str(part.sum() - 1)))  # write_folders' names
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Write scikit-learn's digits as PNG class folders (train/, test/).")
    p.add_argument("root")
    p.add_argument("--size", type=int, default=32, help="side in pixels (the 8x8 digits resized bilinearly)")
    p.add_argument("--seed", type=int, default=0, help="the stratified train/test split's")
    args = p.parse_args(argv)
    write_digits(args.root, size=args.size, seed=args.seed)
    print(f"wrote scikit-learn digits ({args.size}x{args.size} PNG class folders) to {args.root}")


if __name__ == "__main__":
    main()
