"""Datasets, the W/λ split of the training set, and the data loaders.

Every source is a small class behind `make_datasets`, and every source ends in the same `DataBundle`, so
search, retrain and the tests never care where the images came from. Array sources (digits, CIFAR-10,
npz, image folder) are decoded once into a uint8 (N, H, W, 3) array at `input_size`: they are small, and
per-sample work then stays a couple of numpy slices. ImageNet stays on disk in RecordIO and is decoded
per sample.

Sources never download anything: a missing file is a `DataError` naming the files and the folder.
"""

import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet.gluon.data import DataLoader, Dataset
from mxnet.gluon.data.vision import transforms

from .errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class DataBundle:
    """A train and a test set plus what the network and the loaders need to know about them.

    Array sources: items are (uint8 HWC numpy image, int32 label). ImageNet: (uint8 HWC NDArray, label).
    `train_labels` drives the class-balanced W/λ split; `pipeline` picks the augmentation
    ("array": pad-4 crop (+ flip); "imagenet": random resized crop, flip, colour jitter).
    """

    train: Dataset
    test: Dataset
    num_classes: int
    input_size: int
    mean: tuple
    std: tuple
    class_names: tuple
    train_labels: np.ndarray
    pipeline: str = "array"
    hflip: bool = True


class ImageArrays(Dataset):
    """Images and labels held in memory: x uint8 (N, H, W, 3), y int32 (N,)."""

    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __len__(self):
        return len(self.y)


class Subset(Dataset):
    """A view on some items of a dataset (the W part, the λ part, a capped training set)."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])]

    def __len__(self):
        return len(self.indices)


# ----------------------------------------------------------------------------------------------------------
# sources


class DigitsSource:
    """scikit-learn's handwritten digits (1797 8x8 grey images, 10 classes): ships inside the package, so
    the first run needs no download. Test set = a fixed class-balanced 20%. No flips: a mirrored digit is
    not the same digit."""

    test_fraction = 0.2

    def load(self, cfg):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        y = digits.target.astype(np.int32)
        test_idx, train_idx = _take_per_class(y, int(round(len(y) * self.test_fraction)), seed=0)
        return _array_bundle(x[train_idx], y[train_idx], x[test_idx], y[test_idx], cfg.input_size,
                             class_names=tuple(str(i) for i in range(10)), hflip=False)


class Cifar10Source:
    """CIFAR-10 from the official files: python pickle batches (cifar-10-batches-py/) or binary batches
    (cifar-10-batches-bin/), found in data.root itself or in that sub-folder. Read directly: gluon's CIFAR10
    class re-downloads on any checksum mismatch."""

    python_files = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
    binary_files = tuple(f + ".bin" for f in python_files)

    def load(self, cfg):
        root = _root(cfg, "cifar10", "the folder holding cifar-10-batches-py/ or cifar-10-batches-bin/")
        found = self._find(root)
        if found is None:
            raise DataError(
                f"CIFAR-10 not found in {root}: expected data_batch_1..data_batch_5 and test_batch (python "
                f"batches, in cifar-10-batches-py/) or data_batch_1.bin..data_batch_5.bin and test_batch.bin "
                f"(binary, in cifar-10-batches-bin/); extract the archive from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html there or pass --data-root DIR")
        folder, names, reader = found
        parts = [reader(folder / name) for name in names]
        x_train = np.concatenate([p[0] for p in parts[:5]])
        y_train = np.concatenate([p[1] for p in parts[:5]])
        return _array_bundle(x_train, y_train, parts[5][0], parts[5][1], cfg.input_size,
                             class_names=CIFAR10_CLASSES)

    def _find(self, root):
        """The folder and reader of the first complete set of files; partial sets are reported."""
        for folder in (root, root / "cifar-10-batches-py", root / "cifar-10-batches-bin"):
            for names, reader in ((self.python_files, _read_cifar_pickle),
                                  (self.binary_files, _read_cifar_bin)):
                present = [n for n in names if (folder / n).is_file()]
                if len(present) == len(names):
                    return folder, names, reader
                if present:
                    missing = [n for n in names if n not in present]
                    raise DataError(f"CIFAR-10 in {folder} is incomplete: missing {', '.join(missing)}; "
                                    f"re-extract the official archive there")
        return None


def _read_cifar_pickle(path):
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int32)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path} is not a CIFAR-10 python batch: data shape {data.shape}, "
                        f"{len(labels)} labels (expected (N, 3072) and N labels)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar_bin(path):
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DataError(f"{path} is not a CIFAR-10 binary batch: {raw.size} bytes is not a multiple of "
                        f"3073 (1 label byte + 3072 pixel bytes per image)")
    raw = raw.reshape(-1, 3073)
    return raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), raw[:, 0].astype(np.int32)


class NpzSource:
    """Arrays from one .npz file (data.root): x_train, y_train, x_test, y_test; images uint8 (N, H, W, C)
    with C = 1 or 3 (or (N, H, W) for grey), labels integers 0..K-1."""

    keys = ("x_train", "y_train", "x_test", "y_test")

    def load(self, cfg):
        path = _root(cfg, "npz", "the .npz file")
        if not path.is_file():
            raise DataError(f"npz file {path} not found; pass --data-root PATH.npz")
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in self.keys if k not in f.files]
                if missing:
                    raise DataError(f"{path} lacks {', '.join(missing)}; it needs {', '.join(self.keys)}")
                arrays = {k: f[k] for k in self.keys}
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is not a readable .npz file ({e})") from None
        parts = []
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
                raise DataError(f"{path}: x_{split} must be uint8 (N, H, W, 3), (N, H, W, 1) or (N, H, W); "
                                f"got {x.dtype} {x.shape}")
            if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
                raise DataError(f"{path}: y_{split} must be {len(x)} non-negative integer labels; "
                                f"got {y.dtype} {y.shape}")
            parts += [x if x.ndim == 4 else x[..., None], y.astype(np.int32)]
        return _array_bundle(*parts, cfg.input_size)


class FolderSource:
    """An image folder per class: root/train/<class>/*.png|jpg and root/test/<class>/..."""

    def load(self, cfg):
        root = _root(cfg, "folder", "the folder holding train/<class>/ and test/<class>/")
        classes = self._classes(root / "train")
        x_train, y_train = self._read(root / "train", classes, cfg.input_size)
        test_classes = self._classes(root / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DataError(f"{root / 'test'} has classes missing from train/: {', '.join(unknown)}")
        x_test, y_test = self._read(root / "test", classes, cfg.input_size)
        return _array_bundle(x_train, y_train, x_test, y_test, cfg.input_size, class_names=tuple(classes))

    @staticmethod
    def _classes(folder):
        if not folder.is_dir():
            raise DataError(f"image folder {folder} not found; expected {folder}/<class>/*.png|jpg")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{folder} has no class sub-folders; expected {folder}/<class>/*.png|jpg")
        return classes

    @staticmethod
    def _read(folder, classes, size):
        images, labels = [], []
        for label, name in enumerate(classes):
            if not (folder / name).is_dir():
                continue
            for path in sorted((folder / name).iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    img = mx.image.imread(str(path), flag=1)
                except mx.base.MXNetError:
                    raise DataError(f"cannot decode image {path}; remove or replace it") from None
                images.append(_resize_one(img, size))
                labels.append(label)
        if not images:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}/<class>/")
        return np.stack(images), np.asarray(labels, dtype=np.int32)


class ImageNetRecSource:
    """ImageNet (or any image set) packed as MXNet RecordIO: root/train.rec+idx and root/val.rec+idx.
    Images stay on disk and are decoded per sample; labels are read from the record headers only."""

    files = ("train.rec", "train.idx", "val.rec", "val.idx")

    def load(self, cfg):
        root = _root(cfg, "imagenet_rec", "the folder holding train.rec/.idx and val.rec/.idx")
        missing = [f for f in self.files if not (root / f).is_file()]
        if missing:
            raise DataError(f"RecordIO files missing in {root}: {', '.join(missing)}; create them with "
                            f"MXNet's tools/im2rec.py or pass --data-root")
        train = mx.gluon.data.vision.ImageRecordDataset(str(root / "train.rec"))
        test = mx.gluon.data.vision.ImageRecordDataset(str(root / "val.rec"))
        labels = read_record_labels(root / "train.rec", root / "train.idx")
        num_classes = int(labels.max()) + 1
        return DataBundle(train=train, test=test, num_classes=num_classes, input_size=cfg.input_size,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          class_names=tuple(str(i) for i in range(num_classes)), train_labels=labels,
                          pipeline="imagenet")


def read_record_labels(rec_path, idx_path):
    """The label of every record, in the dataset's order, reading only each record's 32-byte header
    (magic, length, IRHeader flag/label/id/id2): a full ImageNet pass would read 140 GB instead."""
    keys, offsets = [], {}
    with open(idx_path) as f:
        for line in f:
            if line.strip():
                key, offset = line.split("\t")
                keys.append(int(key))
                offsets[int(key)] = int(offset)
    labels = np.empty(len(keys), dtype=np.int32)
    with open(rec_path, "rb") as f:
        for i, key in enumerate(keys):
            f.seek(offsets[key])
            head = f.read(32)
            if len(head) < 32:
                raise DataError(f"{rec_path} is truncated at record {key}; rebuild it with im2rec")
            flag, label = struct.unpack("<If", head[8:16])
            if flag > 0:  # multi-label record: the labels follow the header; the first one is the class
                (label,) = struct.unpack("<f", f.read(4))
            labels[i] = int(label)
    return labels


SOURCES = {
    "digits": DigitsSource,
    "cifar10": Cifar10Source,
    "npz": NpzSource,
    "folder": FolderSource,
    "imagenet_rec": ImageNetRecSource,
}


def make_datasets(data_cfg):
    """Load the configured source; `limit_train` keeps a class-balanced, deterministic subset."""
    try:
        source = SOURCES[data_cfg.source]()
    except KeyError:
        raise DataError(f"unknown data source {data_cfg.source!r}; use one of {', '.join(SOURCES)}") from None
    bundle = source.load(data_cfg)
    limit = data_cfg.limit_train
    if limit is not None and limit < len(bundle.train):
        keep, _ = _take_per_class(bundle.train_labels, limit, seed=0)
        bundle.train = Subset(bundle.train, keep)
        bundle.train_labels = bundle.train_labels[keep]
    return bundle


def _root(cfg, source, what):
    if not cfg.root:
        raise DataError(f"data.root is required for data.source={source}: pass --data-root with {what}")
    return Path(os.path.expanduser(cfg.root))


def _array_bundle(x_train, y_train, x_test, y_test, input_size, class_names=None, hflip=True):
    """Bring arrays to (N, size, size, 3) uint8 and measure the per-channel mean/std on the training set."""
    x_train, x_test = (_to_rgb_size(x, input_size) for x in (x_train, x_test))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if class_names is None:
        class_names = tuple(str(i) for i in range(num_classes))
    if num_classes > len(class_names):
        raise DataError(f"labels go up to {num_classes - 1} but there are only {len(class_names)} classes")
    mean, std = _channel_stats(x_train)
    return DataBundle(train=ImageArrays(x_train, y_train), test=ImageArrays(x_test, y_test),
                      num_classes=len(class_names), input_size=input_size, mean=mean, std=std,
                      class_names=tuple(class_names), train_labels=y_train, hflip=hflip)


def _to_rgb_size(x, size):
    if x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    if x.shape[1:3] == (size, size):
        return np.ascontiguousarray(x)
    return np.stack([_resize_one(mx.nd.array(img, dtype="uint8"), size) for img in x])


def _resize_one(img, size):
    """NDArray HWC uint8 -> numpy (size, size, 3); bilinear when enlarging, area when shrinking."""
    interp = 1 if min(img.shape[:2]) < size else 3
    return mx.image.imresize(img, size, size, interp=interp).asnumpy()


def _channel_stats(x, chunk=4096):
    """Per-channel mean and std in [0, 1] units, in chunks (a float64 copy of CIFAR would take 1.2 GB)."""
    total = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk].reshape(-1, 3).astype(np.float64) / 255.0
        total += part.sum(0)
        squares += (part**2).sum(0)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ----------------------------------------------------------------------------------------------------------
# the W/λ split


def split_indices(labels, ratio=(1, 1), seed=0):
    """Split the training set into a W part and a λ part in the ratio w:λ.

    Deterministic under `seed`, class-balanced (every class is split in the same proportion, within one
    image) and disjoint; together the parts cover every index. Returns two sorted int64 arrays.
    """
    w_part, lam_part = ratio
    if w_part < 1 or lam_part < 1:
        raise ValueError(f"split ratio parts must be positive integers, got {ratio}")
    labels = np.asarray(labels)
    n_w = int(np.floor(len(labels) * w_part / (w_part + lam_part) + 0.5))
    return _take_per_class(labels, n_w, seed)


def _take_per_class(labels, total, seed):
    """Pick `total` indices spread over the classes in proportion to their sizes (largest remainder),
    each class's picks drawn from a seeded permutation. Returns (picked, rest), both sorted."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (total / max(len(labels), 1))
    take = np.floor(quota).astype(np.int64)
    # Hand the leftover picks to the classes with the largest fractional parts (ties: lower class first).
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: total - int(take.sum())]] += 1
    picked, rest = [], []
    for c, k in zip(classes, take, strict=True):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        picked.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(picked)), np.sort(np.concatenate(rest))


# ----------------------------------------------------------------------------------------------------------
# augmentation and loaders


class RandomPadCrop:
    """Zero-pad an HWC image by `pad` pixels and crop it back to its size at a random offset."""

    def __init__(self, pad=4):
        self.pad = pad

    def __call__(self, img):
        h, w = img.shape[:2]
        p = self.pad
        padded = np.pad(img, ((p, p), (p, p), (0, 0)))
        i, j = np.random.randint(0, 2 * p + 1, size=2)
        return padded[i:i + h, j:j + w]


class RandomHFlip:
    """Mirror an HWC image left-right with probability 1/2."""

    def __call__(self, img):
        return img[:, ::-1] if np.random.rand() < 0.5 else img


class Cutout:
    """Zero a `size` x `size` square (clipped at the border) at a random centre of every image of an NCHW
    batch (DeVries & Taylor, 2017). Applied after normalisation, so zero is the mean colour."""

    def __init__(self, size):
        self.size = size

    def __call__(self, batch):
        n, _, h, w = batch.shape
        mask = np.ones((n, 1, h, w), dtype=np.float32)
        cy = np.random.randint(0, h, size=n)
        cx = np.random.randint(0, w, size=n)
        half = self.size // 2
        for k in range(n):
            top, left = cy[k] - half, cx[k] - half
            mask[k, :, max(top, 0):top + self.size, max(left, 0):left + self.size] = 0
        return batch * mx.nd.array(mask, ctx=batch.context)


class ArraySample:
    """Per-sample work for array sources: random pad-crop (+ flip) on the uint8 image, float32 label."""

    def __init__(self, augment, hflip):
        self.steps = ([RandomPadCrop(4)] + ([RandomHFlip()] if hflip else [])) if augment else []

    def __call__(self, img, label):
        for step in self.steps:
            img = step(img)
        return img, np.float32(label)


class ImageNetSample:
    """Per-sample work for ImageNet (fb.resnet-style): train = random resized crop, flip, colour jitter and
    PCA lighting; test = resize to size/0.875 and centre crop. Output is a normalised CHW tensor."""

    def __init__(self, augment, size):
        if augment:
            steps = [transforms.RandomResizedCrop(size), transforms.RandomFlipLeftRight(),
                     transforms.RandomColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
                     transforms.RandomLighting(0.1)]
        else:
            resize = int(round(size / 0.875))  # 256 for 224
            steps = [transforms.Resize(resize, keep_ratio=True), transforms.CenterCrop(size)]
        self.transform = transforms.Compose(steps + [transforms.ToTensor(),
                                                     transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, img, label):
        return self.transform(img), np.float32(label)


class Batchify:
    """Stack samples into (x float32 NCHW, y float32). Array samples are stacked as uint8 first and
    normalised as one batch (one operator call instead of one per image); then optional cutout."""

    def __init__(self, mean, std, cutout=0, normalize=True):
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = normalize
        self.cutout = Cutout(cutout) if cutout > 0 else None

    def __call__(self, samples):
        images, labels = zip(*samples, strict=True)
        if self.normalize:
            x = mx.nd.array(np.stack(images), dtype="uint8")
            x = mx.nd.image.normalize(mx.nd.image.to_tensor(x), mean=self.mean, std=self.std)
        else:
            x = mx.nd.stack(*images)
        if self.cutout is not None:
            x = self.cutout(x)
        return x, mx.nd.array(np.asarray(labels, dtype=np.float32))


@dataclass
class Loaders:
    """w / lam: the two parts of the training set (None when split=False); train: the whole training set;
    test: the test set. Training loaders shuffle and drop the last partial batch (constant shapes for
    static hybridisation); the test loader keeps it."""

    w: DataLoader | None
    lam: DataLoader | None
    train: DataLoader
    test: DataLoader


def make_loaders(bundle, data_cfg, seed=0, split=True):
    """Gluon DataLoaders over a bundle, with augmentation on every training loader.

    Uses data_cfg.batch_size / test_batch_size / cutout / split_ratio / num_workers; to retrain, pass
    `dataclasses.replace(cfg.data, batch_size=cfg.retrain.batch_size, cutout=cfg.retrain.cutout)`.
    """
    if bundle.pipeline == "imagenet":
        train_sample = ImageNetSample(True, bundle.input_size)
        test_sample = ImageNetSample(False, bundle.input_size)
    else:
        train_sample = ArraySample(True, bundle.hflip)
        test_sample = ArraySample(False, bundle.hflip)
    normalize = bundle.pipeline != "imagenet"
    train_batch = Batchify(bundle.mean, bundle.std, data_cfg.cutout, normalize)
    test_batch = Batchify(bundle.mean, bundle.std, 0, normalize)

    def train_loader(dataset, part):
        if len(dataset) < data_cfg.batch_size:
            raise DataError(f"the {part} has {len(dataset)} images, fewer than one batch of "
                            f"{data_cfg.batch_size}; lower data.batch_size or raise data.limit_train")
        return DataLoader(dataset.transform(train_sample), batch_size=data_cfg.batch_size, shuffle=True,
                          last_batch="discard", batchify_fn=train_batch, num_workers=data_cfg.num_workers)

    w = lam = None
    if split:
        w_idx, lam_idx = split_indices(bundle.train_labels, data_cfg.split_ratio, seed)
        w = train_loader(Subset(bundle.train, w_idx), "W part of the training set")
        lam = train_loader(Subset(bundle.train, lam_idx), "λ part of the training set")
    train = train_loader(bundle.train, "training set")
    test = DataLoader(bundle.test.transform(test_sample), batch_size=data_cfg.test_batch_size, shuffle=False,
                      last_batch="keep", batchify_fn=test_batch, num_workers=data_cfg.num_workers)
    return Loaders(w=w, lam=lam, train=train, test=test)
