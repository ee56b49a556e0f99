"""Small learnable datasets written in the real on-disk layouts, so tests and the quick demo run through
the same loading code (utils/data.py) as CIFAR-100.

An image is its class's random smooth colour template (partly shared between classes, so that they are not
trivially apart), shifted, brightened and noised: a tiny ResNet gets well above chance in a few epochs, but
not 100% at once. Written by `python -m utils.synthetic ROOT` (see --help).
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

    width = max(2, len(str(num_classes - 1)))
    return (*sample(train_per_class), *sample(test_per_class), [f"class_{i:0{width}d}" for i in range(num_classes)])


def write_synthetic(root, layout="png", num_classes=10, train_per_class=50, test_per_class=20, size=32,
                    seed=0, img_type="png"):
    """Write make_synthetic(...)'s images under `root`: layout "png" as root/{train,test}/<class>/<i>.<img_type>
    (i = the image's position in make_synthetic's order), layout "pickle" as root/cifar-100-python/ in
    the official format (32x32 only). Returns root."""
    train_x, train_y, test_x, test_y, classes = make_synthetic(
        num_classes, train_per_class, test_per_class, size, seed)
    if layout == "png":
        write_folders(os.path.join(root, "train"), train_x, train_y, classes, img_type)
        write_folders(os.path.join(root, "test"), test_x, test_y, classes, img_type)
    elif layout == "pickle":
        if size != 32:
            raise ValueError("the official CIFAR-100 pickle format holds 32x32 images only")
        _write_pickles(os.path.join(root, "cifar-100-python"), train_x, train_y, test_x, test_y, classes)
    else:
        raise ValueError(f"layout must be 'png' or 'pickle', got {layout!r}")
    return root


def write_folders(split_dir, x, y, classes, img_type="png"):
    """Images x (N, 3, H, W) uint8 as <split_dir>/<class name>/<index>.<img_type>, in the order given."""
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


def main():
    parser = argparse.ArgumentParser(description="Write a small synthetic dataset in a CIFAR layout.")
    parser.add_argument("root")
    parser.add_argument("--layout", choices=["png", "pickle"], default="png")
    for name, default in (("classes", 10), ("train_per_class", 50), ("test_per_class", 20), ("size", 32), ("seed", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--img_type", choices=["png", "jpg"], default="png")
    args = parser.parse_args()
    if args.layout == "pickle" and args.size != 32:
        parser.error("--layout pickle holds 32x32 images only (the official format); drop --size")
    write_synthetic(args.root, args.layout, args.classes, args.train_per_class, args.test_per_class,
                    args.size, args.seed, args.img_type)
    print(f"wrote {args.classes} classes x ({args.train_per_class} train + {args.test_per_class} test) "
          f"{args.size}x{args.size} images, layout {args.layout}, to {args.root}")


if __name__ == "__main__":
    main()
