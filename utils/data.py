"""CIFAR-style data: find and load a dataset into memory as uint8 tensors, and batch it on the device.

Two on-disk layouts are recognised without being told which: class folders data_dir/{train,test}/<class>/*.<img_type>,
and data_dir/cifar-100-python/{train,test,meta}, the official archive (or data_dir is that folder), which
torchvision fetches with download=True when neither is present.

BatchLoader holds the whole uint8 dataset on the device and shuffles, augments and normalises there in
batched tensor ops: no DataLoader workers, and data never bounds an epoch. All randomness comes from
generators seeded by (seed, epoch): a resumed run sees exactly the batches the interrupted one would have.
"""
import contextlib
import hashlib
import json
import multiprocessing
import os
import pickle
import socket
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from utils.dist import barrier
from utils.errors import UserError
from utils.faults import kill_point
from utils.files import os_error

PICKLE_DIR = "cifar-100-python"
PICKLE_FILES = ("train", "test", "meta")
PAD = 4  # pixels of zero padding for the random crop
AUGMENTS = ("cifar", "crop", "none")  # random crop + horizontal flip; random crop only; nothing
MIN_STD = 1 / 255  # floor of the per-channel std used for normalisation, in [0, 1] units


class DataError(UserError):
    """A problem with --data_dir or the data flags; its message is one line."""


@dataclass
class Dataset:
    train_x: torch.Tensor  # uint8 (N, 3, S, S)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list  # class names; index i is label i
    layout: str  # "folders" | "pickle"


def _one_line(text):
    return " ".join(str(text).split())


def load_dataset(data_dir, img_type="png", resize=32, download=False, num_workers=0):
    """Load train and test splits from `data_dir`, whichever layout it holds, at resize x resize pixels."""
    if isinstance(resize, bool) or not isinstance(resize, int) or resize <= 0:
        raise DataError(f"--resize must be a positive integer, got {resize!r}")
    img_type = str(img_type).lower().lstrip(".")
    if not img_type:
        raise DataError("--img_type is empty; expected an image file extension such as png or jpg")
    data_dir = os.path.expanduser(str(data_dir))

    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} is a file, expected a directory")
    if not os.path.exists(data_dir) and not download:
        raise DataError(f"--data_dir {data_dir} does not exist")

    if os.path.isdir(data_dir):
        if any(os.path.isdir(os.path.join(data_dir, split)) for split in ("train", "test")):
            return _load_folders(data_dir, img_type, resize, num_workers)
        if os.path.isdir(os.path.join(data_dir, PICKLE_DIR)):
            return _load_pickles(os.path.join(data_dir, PICKLE_DIR), resize)
        if os.path.basename(os.path.normpath(data_dir)) == PICKLE_DIR or all(
                os.path.isfile(os.path.join(data_dir, f)) for f in PICKLE_FILES):  # data_dir holds the pickles
            return _load_pickles(data_dir, resize)
    if download:
        return _load_pickles(_download(data_dir), resize)
    entries = sorted(e for e in os.listdir(data_dir) if not e.startswith("."))
    raise DataError(
        f"--data_dir {data_dir} holds neither train/<class>/*.{img_type} + test/<class>/*.{img_type} "
        f"nor {PICKLE_DIR}/ (use --download to fetch CIFAR-100); "
        + (f"it holds: {_short(entries, 5, 'entries')}" if entries else "it is empty"))


def _download(data_dir):
    import torchvision  # only needed here; keeps import of this module light

    try:
        torchvision.datasets.CIFAR100(data_dir, train=True, download=True)
    except Exception as e:  # no network, disk full, bad checksum: all are the user's to fix
        raise DataError(f"could not download CIFAR-100 into {data_dir}: {_one_line(e)}") from None
    return os.path.join(data_dir, PICKLE_DIR)


def _load_pickles(pickle_dir, resize):
    for name in PICKLE_FILES:
        if not os.path.isfile(os.path.join(pickle_dir, name)):
            raise DataError(f"{pickle_dir} lacks the file '{name}'; expected the official CIFAR-100 "
                            f"python archive ({', '.join(PICKLE_FILES)})")
    meta = _read_pickle(os.path.join(pickle_dir, "meta"), [b"fine_label_names"])
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]
    train, test = (_pickle_split(os.path.join(pickle_dir, split), len(classes), resize) for split in ("train", "test"))
    return Dataset(*train, *test, classes, "pickle")


def _read_pickle(path, keys):
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")  # the official files were written by Python 2
    except Exception as e:
        raise DataError(f"cannot read {path} as a CIFAR-100 pickle: {_one_line(e)}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a dict as in the CIFAR-100 archive")
    for key in keys:
        if key not in obj:
            raise DataError(f"{path} lacks the key {key!r}; expected the official CIFAR-100 format")
    return obj


def _pickle_split(path, num_classes, resize):
    d = _read_pickle(path, [b"data", b"fine_labels"])
    data = np.asarray(d[b"data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataError(f"{path}: b'data' is {data.dtype} of shape {data.shape}, expected uint8 N x 3072")
    labels = np.asarray(d[b"fine_labels"], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels span {labels.min()}..{labels.max()}, "
                        f"but meta names {num_classes} classes")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # rows are CHW already
    return _resize_tensor(x, resize), torch.from_numpy(labels)


def _resize_tensor(x, size, chunk=4096):
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = torch.empty(x.shape[0], 3, size, size, dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):  # in chunks: float copies of 50,000 images are 600 MB
        part = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)
        out[i:i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _load_folders(data_dir, img_type, resize, num_workers):
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            raise DataError(f"--data_dir {data_dir} has no {split}/ folder; expected "
                            f"train/<class>/*.{img_type} and test/<class>/*.{img_type}")
    train_files, classes = _list_images(os.path.join(data_dir, "train"), img_type)
    test_files, test_classes = _list_images(os.path.join(data_dir, "test"), img_type)
    if test_classes != classes:
        raise DataError(f"class folders of {data_dir}/test differ from those of train: only in train: "
                        f"{_short(sorted(set(classes) - set(test_classes)), 5)}; only in test: "
                        f"{_short(sorted(set(test_classes) - set(classes)), 5)}")
    return Dataset(*_decode_all(train_files, resize, num_workers), *_decode_all(test_files, resize, num_workers),
                   classes, "folders")


def _list_images(split_dir, img_type):
    """[(path, label)] in sorted class then file name order, and the sorted class names."""
    suffixes = (".jpg", ".jpeg") if img_type in ("jpg", "jpeg") else (f".{img_type}",)
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} holds no class folders; expected {split_dir}/<class>/*.{img_type}")
    files, other_suffixes = [], set()
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        for entry in sorted(e for e in os.listdir(class_dir) if not e.startswith(".")):
            if entry.lower().endswith(suffixes):
                files.append((os.path.join(class_dir, entry), label))
            else:
                other_suffixes.add(os.path.splitext(entry)[1].lower() or entry)
    found = {label for _, label in files}
    empty = [name for label, name in enumerate(classes) if label not in found]
    if not files:
        other = f"found other files: {', '.join(sorted(other_suffixes))}" if other_suffixes else "found no files"
        raise DataError(f"no *.{img_type} images under {split_dir} ({other}); check --img_type")
    if empty:
        raise DataError(f"class folder {os.path.join(split_dir, empty[0])} holds no *.{img_type} images"
                        + (f" ({len(empty)} such folders)" if len(empty) > 1 else ""))
    return files, classes


# alpha is composited on black: the colour of the random crop's zero padding (and what most tools store under 0)
ALPHA_BACKGROUND = (0, 0, 0)
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(im, name="image"):
    """A PIL image as the 8-bit RGB picture it shows (docs/robustness.md), or DataError naming `name`."""
    from PIL import Image, ImageOps

    with contextlib.suppress(Exception):  # a broken EXIF block does not make the pixels unusable
        im = ImageOps.exif_transpose(im)
    if im.mode in _WIDE_INT_MODES:
        v = np.asarray(im, dtype=np.int64)
        if v.size and (v.min() < 0 or v.max() > 65535):
            raise DataError(f"image {name}: {im.mode} pixels span {v.min()}..{v.max()}, outside the 16-bit "
                            f"range 0..65535; save it as 8- or 16-bit")
        im = Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8))  # v / 257 rounded: scaled, not clipped
    elif im.mode == "F":
        raise DataError(f"image {name}: floating-point pixels (mode F) have no defined 8-bit scale; save it "
                        f"as 8- or 16-bit")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, ALPHA_BACKGROUND)
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def decode_image(source, size, name=None):
    """One image (a path, a PIL image or a uint8 array H x W [x C]) -> uint8 array (size, size, 3), as the
    training data was decoded. Errors: DataError naming the image."""
    from PIL import Image

    name = name or (source if isinstance(source, (str, os.PathLike)) else "image")
    try:
        if isinstance(source, (str, os.PathLike)):
            with Image.open(source) as im:
                im.load()
                rgb = to_rgb8(im, name)
        elif isinstance(source, Image.Image):
            rgb = to_rgb8(source, name)
        else:
            rgb = to_rgb8(Image.fromarray(np.asarray(source)), name)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BILINEAR)  # PIL's bilinear antialiases when shrinking
        return np.asarray(rgb)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read image {name}: {_one_line(e)}") from None


def _decode_chunk(paths, size):
    """Decode image files into one uint8 array (n, size, size, 3). Runs in worker processes."""
    return np.stack([decode_image(path, size) for path in paths])


def _decode_all(files, resize, num_workers, chunk=500):
    paths, labels = zip(*files)
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    # more processes than the cores this one may run on (its affinity mask, set by a scheduler) only queue
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(num_workers, len(chunks), cores)
    if workers > 1:
        # one array per chunk of files crosses the process boundary, not one per image. A fork server's workers,
        # never forked from this process: a child forked from one holding CUDA (or NCCL) can hang or crash
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
            arrays = list(pool.map(_decode_chunk, chunks, [resize] * len(chunks)))
    else:
        arrays = [_decode_chunk(c, resize) for c in chunks]
    x = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return x, torch.tensor(labels, dtype=torch.int64)


def _node_cache(data_dir, img_type, resize):
    """The decoded dataset's file in the temporary directory, named by the job, the machine and what was decoded:
    this job's processes here find it, other jobs and machines (a temporary directory on the network) never."""
    key = json.dumps([socket.gethostname(), os.environ.get("TORCHELASTIC_RUN_ID"), os.environ.get("MASTER_ADDR"),
                      os.environ.get("MASTER_PORT"), os.path.abspath(os.path.expanduser(str(data_dir))),
                      str(img_type), resize])
    return os.path.join(tempfile.gettempdir(), "dynprune-decoded-" + hashlib.sha256(key.encode()).hexdigest()[:16])


def _write_node_cache(path, content):
    """`content` (a Dataset's fields, or {"error": the DataError's line}) in one file renamed into place: a reader
    never sees half of it, and a restarted job's (torchrun --max_restarts) is replaced."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:  # written through a file object, torch.save's error holds the OSError (os_error)
        torch.save(content, f)
    os.replace(tmp, path)


def load_dataset_once(ctx, data_dir, img_type="png", resize=32, download=False, num_workers=0):
    """load_dataset, done once per machine under torchrun by local rank 0 (docs/stages.md); its DataError is
    every process's."""
    if not ctx.distributed:
        return load_dataset(data_dir, img_type, resize, download, num_workers)
    path = _node_cache(data_dir, img_type, resize)
    ds = None  # the dataset, or the DataError local rank 0 met
    if ctx.local_rank == 0:
        try:
            kill_point("decode", ctx.local_rank)
            ds = load_dataset(data_dir, img_type, resize, download, num_workers)
            _write_node_cache(path, vars(ds))
        except DataError as e:
            ds = e
            _write_node_cache(path, {"error": str(e)})
        except Exception as e:  # no room in the temporary directory: the other processes decode for themselves
            if os_error(e) is None:
                raise
            print(f"warning: cannot keep the decoded images in {tempfile.gettempdir()} ({os_error(e).strerror}): every "
                  f"process decodes them itself (set TMPDIR to a folder with room)", file=sys.stderr, flush=True)
    barrier()
    # none to read: a launcher whose processes on one machine do not share the job's names (they decode below)
    if ctx.local_rank != 0 and os.path.isfile(path):
        content = torch.load(path, mmap=True, weights_only=True)  # copy on write: page cache shared, tensors writable
        ds = DataError(content["error"]) if "error" in content else Dataset(**content)
    barrier()  # every process has read it (memory-mapped files stay readable once removed)
    if ctx.local_rank == 0 and os.path.exists(path):
        os.remove(path)
    if isinstance(ds, DataError):
        raise ds
    if ds is None:
        kill_point("decode", ctx.local_rank)
        ds = load_dataset(data_dir, img_type, resize, download, num_workers)
    return ds


def split_val(x, y, fraction, seed):
    """Hold out round(fraction * N) random images as a validation split; both parts keep their order."""
    if not 0 <= fraction < 1:
        raise DataError(f"the validation fraction must be in [0, 1), got {fraction}")
    n = x.shape[0]
    n_val = min(int(round(n * fraction)), max(n - 1, 0))  # always leave something to train on
    if n_val == 0:
        return x, y, x[:0], y[:0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def channel_stats(x_uint8, chunk=1024):
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units, as float32 tensors."""
    if x_uint8.shape[0] == 0:
        raise DataError("cannot compute channel statistics of an empty image set")
    sums = torch.zeros(2, x_uint8.shape[1], dtype=torch.float64)  # of x and of x squared, per channel
    for i in range(0, x_uint8.shape[0], chunk):  # float64 copies of everything at once would be 1.2 GB
        part = x_uint8[i:i + chunk].to(torch.float64)
        sums += torch.stack([part.sum(dim=(0, 2, 3)), part.square().sum(dim=(0, 2, 3))])
    mean, mean_sq = sums / (x_uint8.numel() // x_uint8.shape[1])
    # a channel that never varies (std 0) carries nothing: its std floored at one grey level keeps the input finite
    std = (mean_sq - mean.square()).clamp_min(0).sqrt().clamp_min(MIN_STD * 255)
    return (mean / 255).float(), (std / 255).float()


def make_pipeline(resize, mean, std, classes, augment):
    """The input pipeline a network is trained with, as every checkpoint records it (plain data):
    {"resize": side in pixels, "mean" / "std": 3 floats in [0, 1] units, "classes": names, "augment"}."""
    return {"resize": int(resize), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "classes": [str(c) for c in classes], "augment": augment}


def check_pipeline(p, where):
    """`p` if it is a usable pipeline record (its normalisation finite), else DataError naming `where`."""
    def bad(why):
        return DataError(f"{where}: its input pipeline record is unusable ({why})")
    if not isinstance(p, dict):
        raise bad("not a dict")
    if isinstance(p.get("resize"), bool) or not isinstance(p.get("resize"), int) or p["resize"] < 1:
        raise bad(f"resize {p.get('resize')!r}")
    for key in ("mean", "std"):
        v = p.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(a, (int, float)) and np.isfinite(a)
                                                            for a in v)):
            raise bad(f"{key} {v!r} is not 3 finite numbers")
    if min(p["std"]) <= 0:
        raise bad(f"std {p['std']} is not positive")
    if not isinstance(p.get("classes"), list) or not p["classes"]:
        raise bad("no class names")
    if p.get("augment") not in AUGMENTS:
        raise bad(f"augment {p.get('augment')!r}")
    return p


class Preprocess:
    """Raw 8-bit images (a path, PIL image or uint8 array H x W [x 3], a list of them, or a uint8 array /
    tensor (N, H, W, 3)) -> the normalised float batch a network expects, from the pipeline its checkpoint
    records: no training set needed. `classes[i]` names logit i."""

    def __init__(self, pipeline, where="pipeline"):
        self.pipeline = check_pipeline(pipeline, where)
        self.size = pipeline["resize"]
        self.classes = list(pipeline["classes"])
        self.mean = torch.tensor(pipeline["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(pipeline["std"]).view(1, 3, 1, 1)

    def __call__(self, images, device="cpu"):
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        x = torch.from_numpy(np.stack([decode_image(im, self.size) for im in images])).permute(0, 3, 1, 2)
        return ((x.float() / 255 - self.mean) / self.std).to(device)


def crop_and_flip(x, offsets, flips, pad=PAD):
    """Per image b: the window of x[b] zero-padded by `pad` whose top-left corner is offsets[b] = (dy, dx)
    in padded coordinates (so (pad, pad) is the image itself), mirrored left-right where flips[b].
    One gather over the whole batch; offsets (B, 2) and flips (B,) must be on x's device."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    ar_w = torch.arange(w, device=x.device)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H): source row of every output row
    cols = offsets[:, 1:2] + torch.where(flips[:, None].bool(), ar_w.flip(0), ar_w)  # (B, W)
    # flat position in the padded plane, shared by all channels: one gather beats 4-way advanced indexing
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)


def augment(x_uint8_batch, generator, pad=PAD, flip=True):
    """CIFAR augmentation of a batch on its device: a random crop of the `pad`-zero-padded image and (if `flip`)
    a random horizontal flip, drawn per image from `generator` (flip=False draws the same, then ignores them)."""
    b = x_uint8_batch.shape[0]
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator, device=generator.device)
    flips = torch.randint(0, 2, (b,), generator=generator, device=generator.device)
    if generator.device != x_uint8_batch.device:  # a Tensor.to per batch is what the generator's device avoids
        offsets, flips = offsets.to(x_uint8_batch.device), flips.to(x_uint8_batch.device)
    return crop_and_flip(x_uint8_batch, offsets, flips if flip else torch.zeros_like(flips), pad)


def _seeded_generator(*keys):
    """A CPU generator whose state depends only on the integers `keys` (well mixed, no collisions)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


class BatchLoader:
    """Batches (x float32 normalised, y int64) of uint8 images, augmented and normalised on `device`; call
    set_epoch(e) before epoch e (the augmentation depends on the rank too).
    train=True: each epoch rank r takes perm[r::world_size] of one permutation (the same on every rank) cut
    to a multiple of world_size, the last incomplete batch dropped: every rank runs as many steps. augment:
    "cifar" (crop + flip, the default), "crop" (mirror images of digits or text are other symbols) or
    "none"/False (the training images shuffled but unaugmented).
    train=False: fixed order, unaugmented, the last partial batch kept; rank r takes the r-th contiguous
    shard, so the ranks together see every image once."""

    def __init__(self, x_uint8, y, batch_size, *, train, device, mean, std, seed=0, rank=0, world_size=1,
                 channels_last=False, augment=None):
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size <= 0:
            raise DataError(f"the batch size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.x = x_uint8.to(self.device)  # once: every epoch reads from device memory
        self.y = y.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.train = train
        if augment is None or augment is True:
            augment = "cifar" if train else "none"
        if augment not in AUGMENTS + (False,):
            raise DataError(f"unknown augmentation {augment!r} (expected one of {', '.join(AUGMENTS)})")
        self.augment = augment or "none"
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        self.epoch = 0
        # normalisation folded into one multiply-add: (x / 255 - mean) / std
        std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1 / (255 * std)).to(self.device)
        self.shift = (-mean / std).to(self.device)
        if not (torch.isfinite(self.scale).all() and torch.isfinite(self.shift).all()):
            raise DataError(f"the normalisation (mean {mean.flatten().tolist()}, std {std.flatten().tolist()}) "
                            f"would make the input non-finite")

        n = x_uint8.shape[0]
        if train:
            per_rank = n // world_size
            self.num_batches = per_rank // batch_size
            if self.num_batches == 0:
                raise DataError(f"batch size {batch_size} exceeds the {per_rank} training images "
                                f"available to each of {world_size} process(es)")
            self.num_samples = self.num_batches * batch_size
        else:
            self.shard = (n * rank // world_size, n * (rank + 1) // world_size)  # even contiguous shards
            self.num_samples = self.shard[1] - self.shard[0]
            self.num_batches = -(-self.num_samples // batch_size)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.num_batches

    def _indices(self):
        if not self.train:
            return torch.arange(*self.shard)
        n = self.x.shape[0]
        perm = torch.randperm(n, generator=_seeded_generator(self.seed, self.epoch))
        mine = perm[:n - n % self.world_size][self.rank::self.world_size]
        return mine[:self.num_samples]

    def __iter__(self):
        idx = self._indices().to(self.device)  # one copy per epoch
        # drawn on the images' device: a CPU generator's draws would be copied from pageable memory every batch
        aug_gen = torch.Generator(device=self.x.device)
        aug_gen.manual_seed(_seeded_generator(self.seed, self.epoch, self.rank, 1).initial_seed())
        for start in range(0, self.num_samples, self.batch_size):
            batch_idx = idx[start:start + self.batch_size]
            x = self.x.index_select(0, batch_idx)
            if self.augment != "none":
                x = augment(x, aug_gen, flip=self.augment == "cifar")
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)  # elementwise ops below keep it
            x = x.float().mul_(self.scale).add_(self.shift)
            yield x, self.y.index_select(0, batch_idx)


DEFAULT_RESIZE = 32


@dataclass
class Data:
    train: BatchLoader        # augmented, shuffled, sharded over ranks
    plain_train: BatchLoader  # train images shuffled, not augmented (stage 2's factor pass, BN statistics)
    eval: BatchLoader         # validation split if --val_split > 0, else test (reported, never selected on)
    test: BatchLoader         # None under --final_split val: the run never reads the test split
    num_classes: int
    image_size: int
    eval_name: str
    pipeline: dict            # what checkpoints record (make_pipeline)
    final_name: str = "test"  # the split of the final evaluation (--final_split)


@dataclass(frozen=True)
class DataSettings:
    """What load_data reads: the data flags of a run (utils/cli.py's, or stage 2's config keys)."""
    data_dir: str
    bs: int                   # batch size of a step over all processes (process_batch: this process's share)
    img_type: str = "png"
    resize: int = None        # None: the recorded pipeline's, else DEFAULT_RESIZE
    augment: str = None       # None: the recorded pipeline's, else "cifar"
    val_split: float = 0.0
    seed: int = 0
    num_workers: int = 0
    download: bool = False
    final_split: str = "test"

    @classmethod
    def of(cls, flags, **given):
        """The settings among a run's flags (an argparse namespace or a config dict), `given` in place of theirs."""
        values = {**(flags if isinstance(flags, dict) else vars(flags)), **given}
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def process_batch(bs, ctx):
    """This process's share of `bs`, the batch of a step over all processes (docs/stages.md)."""
    if not ctx.distributed:
        return bs
    p = ctx.world_size
    if bs % p:
        below, above = bs - bs % p, bs - bs % p + p
        raise UserError(f"batch size {bs} is the batch of a step over all {p} processes, and {p} does not divide "
                        f"it (each process takes bs / {p}): use {below or above}" + (f" or {above}" if below else ""))
    if ctx.is_main:
        print(f"torchrun: {p} processes, batch {bs} per step in all ({bs // p} per process): the same recipe as "
              f"one process at batch {bs}; images decoded once per machine", flush=True)
    return bs // p


def load_data(args, ctx, recorded=None, source=None, resuming=False):
    """The loaders of DataSettings `args`: the dataset decoded once, validation split off.
    `recorded`: the input pipeline of the checkpoint the stage starts from (`source` names it): its resize,
    normalisation and classes are used (a conflicting resize or class list is refused), its augmentation is
    the default (a conflict too when `resuming`). Without one: args.resize, the training split's statistics."""
    resize, augment = args.resize, args.augment
    if recorded is not None:
        if resize is not None and resize != recorded["resize"]:
            raise UserError(f"resize {resize} conflicts with {source}, trained on images resized to "
                            f"{recorded['resize']} (leave resize out to use it)")
        if resuming and augment is not None and augment != recorded["augment"]:
            raise UserError(f"augment {augment} conflicts with {source}, trained with augment "
                            f"{recorded['augment']}")
        resize, augment = recorded["resize"], augment or recorded["augment"]
    elif source is not None and ctx.is_main:
        print(f"warning: {source} records no input pipeline: using resize "
              f"{resize or DEFAULT_RESIZE} and the statistics of this training set", file=sys.stderr, flush=True)
    resize, augment = resize or DEFAULT_RESIZE, augment or "cifar"
    bs = process_batch(args.bs, ctx)
    ds = load_dataset_once(ctx, args.data_dir, args.img_type, resize, args.download, args.num_workers)
    if recorded is not None and ds.classes != recorded["classes"]:
        raise UserError(f"data_dir {args.data_dir} holds other classes than {source} was trained on "
                        f"({_class_difference(ds.classes, recorded['classes'])})")
    train_x, train_y, val_x, val_y = split_val(ds.train_x, ds.train_y, args.val_split, args.seed)
    if len(train_x) == 0:
        raise UserError(f"--data_dir {args.data_dir}: no training images left after --val_split")
    if args.val_split > 0 and len(val_x) == 0:  # else evaluation would quietly fall back to test
        n = len(ds.train_y)
        if n == 1:
            raise UserError(f"--val_split {args.val_split} holds out no image: there is 1 training image, and "
                            f"one must be left to train on")
        raise UserError(f"--val_split {args.val_split} holds out no image of the {n} training images; the "
                        f"smallest fraction that holds one out is {1 / n:.3g}")
    # a class without a training image can never be learnt: say which, not a quietly useless logit
    before = torch.bincount(ds.train_y, minlength=len(ds.classes)).tolist()
    after = torch.bincount(train_y, minlength=len(ds.classes)).tolist()
    never = [c for c, k in zip(ds.classes, before) if k == 0]
    if never:
        raise UserError(f"--data_dir {args.data_dir}: {_classes(never)} no training image")
    gone = [c for c, k in zip(ds.classes, after) if k == 0]
    if gone:
        raise UserError(f"--val_split {args.val_split} (seed {args.seed}) leaves {_classes(gone)} no training "
                        f"image (all held out for validation); lower --val_split or add training images")
    if len(ds.classes) < 2:  # every prediction would be right: a "100%" that measures nothing
        raise UserError(f"--data_dir {args.data_dir} holds one class ({ds.classes[0]}): a classifier needs two or "
                        f"more")
    final = args.final_split
    if final == "val" and len(val_x) == 0:
        raise UserError("--final_split val needs a validation split: give --val_split > 0")
    if recorded is not None:
        mean, std = recorded["mean"], recorded["std"]
    else:
        mean, std = channel_stats(train_x)
        if bool((std <= MIN_STD * 1.001).all()) and ctx.is_main:  # a data problem, said as one, not a NaN later
            print(f"warning: every training image of {args.data_dir} is one flat colour (no channel varies): "
                  f"nothing to learn from the pixels", file=sys.stderr, flush=True)
    pipeline = make_pipeline(resize, mean, std, ds.classes, augment)
    common = dict(device=ctx.device, mean=pipeline["mean"], std=pipeline["std"], rank=ctx.rank,
                  world_size=ctx.world_size, channels_last=ctx.channels_last)
    test = BatchLoader(ds.test_x, ds.test_y, bs, train=False, **common) if final == "test" else None
    val = BatchLoader(val_x, val_y, bs, train=False, **common) if len(val_x) else None
    return Data(train=BatchLoader(train_x, train_y, bs, train=True, seed=args.seed, augment=augment, **common),
                plain_train=BatchLoader(train_x, train_y, bs, train=True, augment=False, seed=args.seed, **common),
                eval=val or test, test=test, num_classes=len(ds.classes), image_size=resize,
                eval_name="val" if val else "test", pipeline=pipeline, final_name=final)


def _short(names, limit=3, total="in all"):
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} {total})" if len(names) > limit else "")


def _classes(names):
    return f"class {names[0]} has" if len(names) == 1 else f"classes {_short(names)} have"


def _class_difference(data_classes, ckpt_classes):
    """How the data's class list differs from a checkpoint's, in words (only what is true of the two)."""
    only_here = sorted(set(data_classes) - set(ckpt_classes))
    only_there = sorted(set(ckpt_classes) - set(data_classes))
    count = (f"the data has {len(data_classes)} classes, the checkpoint {len(ckpt_classes)}"
             if len(data_classes) != len(ckpt_classes) else f"{len(data_classes)} classes each")
    parts = ([f"only in the data: {_short(only_here)}"] if only_here else []) \
        + ([f"only in the checkpoint: {_short(only_there)}"] if only_there else [])
    if not parts:
        parts = ["same names, other order" if len(data_classes) == len(ckpt_classes) else "names repeated"]
    return f"{count}: {'; '.join(parts)}"
