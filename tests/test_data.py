import pickle

import mxnet as mx
import numpy as np
import pytest

from dsonas.config import DataConfig
from dsonas.data import (
    Cutout,
    RandomPadCrop,
    make_datasets,
    make_loaders,
    read_record_labels,
    split_indices,
)
from dsonas.errors import DataError

# ---------------------------------------------------------------------------------------------------------
# tiny data files written by the tests


def _cifar_arrays(n, seed):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (n, 3072), dtype=np.uint8), (np.arange(n) % 10).astype(np.int64)


def write_cifar_python(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data, labels = _cifar_arrays(n, k)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist(), b"batch_label": b"x"}, f)


def write_cifar_binary(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
        data, labels = _cifar_arrays(n, k)
        np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1).tofile(folder / name)


@pytest.mark.parametrize("writer, sub", [(write_cifar_python, "cifar-10-batches-py"),
                                         (write_cifar_binary, "cifar-10-batches-bin")])
def test_cifar_files(tmp_path, writer, sub):
    writer(tmp_path / sub)
    bundle = make_datasets(DataConfig(source="cifar10", root=str(tmp_path)))
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (30, 6, 10)
    assert bundle.class_names[0] == "airplane" and bundle.hflip
    data, labels = _cifar_arrays(6, 1)  # data_batch_2 holds training images 6..11
    x, y = bundle.train[7]
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8 and y == labels[1]
    # row-major CHW in the file -> HWC in memory
    assert x[5, 9, 2] == data[1, 2 * 1024 + 5 * 32 + 9] and x[0, 0, 0] == data[1, 0]
    x_test, _ = bundle.test[0]
    assert np.array_equal(x_test[..., 1].ravel(), _cifar_arrays(6, 5)[0][0, 1024:2048])
    # data.root may also point at the batches folder itself
    direct = make_datasets(DataConfig(source="cifar10", root=str(tmp_path / sub)))
    assert np.array_equal(direct.train.x, bundle.train.x)


def test_cifar_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match="data_batch_1") as info:
        make_datasets(DataConfig(source="cifar10", root=str(tmp_path)))
    assert str(tmp_path) in str(info.value) and "test_batch.bin" in str(info.value)
    write_cifar_python(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        make_datasets(DataConfig(source="cifar10", root=str(tmp_path)))
    with pytest.raises(DataError, match="data.root is required"):
        make_datasets(DataConfig(source="cifar10", root=None))


def test_cifar_malformed_batch(tmp_path):
    write_cifar_binary(tmp_path)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="test_batch.bin .*3073"):
        make_datasets(DataConfig(source="cifar10", root=str(tmp_path)))


def test_npz_resizes_and_expands_grey(tmp_path):
    rng = np.random.RandomState(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.randint(0, 256, (12, 16, 16), dtype=np.uint8), y_train=np.arange(12) % 3,
             x_test=rng.randint(0, 256, (4, 16, 16, 1), dtype=np.uint8), y_test=np.arange(4) % 3)
    bundle = make_datasets(DataConfig(source="npz", root=str(path), input_size=32))
    assert bundle.train.x.shape == (12, 32, 32, 3) and bundle.test.x.shape == (4, 32, 32, 3)
    assert bundle.num_classes == 3 and bundle.train.y.dtype == np.int32
    x, _ = bundle.train[0]
    assert np.array_equal(x[..., 0], x[..., 2])   # grey copied to every channel


@pytest.mark.parametrize("arrays, message", [
    (dict(x_train=np.zeros((2, 8, 8, 3), np.uint8), y_train=np.zeros(2, int)), "lacks x_test, y_test"),
    (dict(x_train=np.zeros((2, 8, 8, 3), np.float32), y_train=np.zeros(2, int),
          x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.zeros(2, int)), "x_train must be uint8"),
    (dict(x_train=np.zeros((2, 8, 8, 3), np.uint8), y_train=np.zeros(3, int),
          x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.zeros(2, int)), "y_train must be 2"),
])
def test_npz_validation(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        make_datasets(DataConfig(source="npz", root=str(path), input_size=8))
    with pytest.raises(DataError, match="not found"):
        make_datasets(DataConfig(source="npz", root=str(tmp_path / "none.npz")))


def test_image_folder(tmp_path):
    import cv2

    colours = {"cat": (0, 0, 255), "dog": (255, 0, 0)}  # BGR for cv2: cat is red, dog is blue
    for split, count in (("train", 3), ("test", 1)):
        for name, bgr in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(count):
                img = np.zeros((20, 24, 3), np.uint8) + np.array(bgr, np.uint8)
                cv2.imwrite(str(tmp_path / split / name / f"{k}.png"), img)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    bundle = make_datasets(DataConfig(source="folder", root=str(tmp_path), input_size=16))
    assert bundle.class_names == ("cat", "dog") and bundle.num_classes == 2
    assert bundle.train.x.shape == (6, 16, 16, 3) and list(bundle.train.y) == [0, 0, 0, 1, 1, 1]
    assert tuple(bundle.train.x[0, 3, 3]) == (255, 0, 0)      # RGB: red cat
    assert tuple(bundle.test.x[1, 3, 3]) == (0, 0, 255)
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="bird"):
        make_datasets(DataConfig(source="folder", root=str(tmp_path), input_size=16))
    with pytest.raises(DataError, match="not found"):
        make_datasets(DataConfig(source="folder", root=str(tmp_path / "nothing")))


def test_digits_default():
    bundle = make_datasets(DataConfig())
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (1438, 359, 10)
    assert bundle.train.x.shape == (1438, 32, 32, 3) and bundle.train.x.dtype == np.uint8
    assert bundle.train.x.max() == 255 and not bundle.hflip
    counts = np.bincount(bundle.test.y)
    assert counts.min() >= 34 and counts.max() <= 37         # a class-balanced 20%
    capped = make_datasets(DataConfig(limit_train=200))
    assert len(capped.train) == 200 and np.bincount(capped.train_labels).min() >= 19


def test_imagenet_recordio(tmp_path):
    labels = [3, 0, 2, 1, 3, 0]
    for name in ("train", "val"):
        rec = mx.recordio.MXIndexedRecordIO(str(tmp_path / f"{name}.idx"), str(tmp_path / f"{name}.rec"), "w")
        for i, label in enumerate(labels):
            img = np.full((40, 50, 3), 40 * i, np.uint8)
            header = mx.recordio.IRHeader(0, float(label), i, 0)
            rec.write_idx(i, mx.recordio.pack_img(header, img, quality=95, img_fmt=".png"))
        rec.close()
    assert list(read_record_labels(tmp_path / "train.rec", tmp_path / "train.idx")) == labels
    cfg = DataConfig(source="imagenet_rec", root=str(tmp_path), input_size=24, batch_size=2,
                     test_batch_size=4)
    bundle = make_datasets(cfg)
    assert bundle.num_classes == 4 and bundle.pipeline == "imagenet"
    loaders = make_loaders(bundle, cfg, seed=0, split=True)
    x, y = next(iter(loaders.w))
    assert x.shape == (2, 3, 24, 24) and x.dtype == np.float32 and y.dtype == np.float32
    batches = list(loaders.test)
    assert [b[0].shape[0] for b in batches] == [4, 2] and batches[0][0].shape[2:] == (24, 24)
    (tmp_path / "val.idx").unlink()
    with pytest.raises(DataError, match="val.idx"):
        make_datasets(cfg)


# ---------------------------------------------------------------------------------------------------------
# the W/λ split


def test_split_is_deterministic_disjoint_and_complete():
    labels = np.repeat(np.arange(10), 50)[np.random.RandomState(3).permutation(500)]
    w, lam = split_indices(labels, (1, 1), seed=7)
    w2, lam2 = split_indices(labels, (1, 1), seed=7)
    assert np.array_equal(w, w2) and np.array_equal(lam, lam2)
    assert not np.array_equal(w, split_indices(labels, (1, 1), seed=8)[0])
    assert len(np.intersect1d(w, lam)) == 0
    assert np.array_equal(np.union1d(w, lam), np.arange(500))
    assert len(w) == len(lam) == 250


@pytest.mark.parametrize("ratio", [(1, 1), (4, 1), (3, 2)])
def test_split_is_class_balanced(ratio):
    counts = [37, 50, 13, 100, 8]                           # uneven classes, odd sizes
    labels = np.repeat(np.arange(5), counts)
    w, lam = split_indices(labels, ratio, seed=0)
    share = ratio[0] / sum(ratio)
    assert len(w) == int(np.floor(len(labels) * share + 0.5))
    for c, n in enumerate(counts):
        assert abs(np.sum(labels[w] == c) - n * share) < 1.0
        assert np.sum(labels[w] == c) + np.sum(labels[lam] == c) == n


def test_split_rejects_bad_ratio():
    with pytest.raises(ValueError):
        split_indices(np.zeros(4), (1, 0))


# ---------------------------------------------------------------------------------------------------------
# loaders and augmentation


@pytest.fixture(scope="module")
def digits():
    return make_datasets(DataConfig())


def test_loaders_shapes_and_types(digits):
    cfg = DataConfig(batch_size=100, test_batch_size=200)
    loaders = make_loaders(digits, cfg, seed=0, split=True)
    assert len(loaders.w) == 7 and len(loaders.lam) == 7    # 719 images each, partial batch dropped
    assert len(loaders.train) == 14 and len(loaders.test) == 2
    for x, y in loaders.w:
        assert x.shape == (100, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.float32
    sizes = [x.shape[0] for x, _ in loaders.test]
    assert sizes == [200, 159]                              # the test loader keeps the last batch
    # test images are only normalised: exactly (x / 255 - mean) / std, in order
    x, y = next(iter(loaders.test))
    expected = (digits.test.x[0].astype(np.float32) / 255 - np.array(digits.mean)) / np.array(digits.std)
    np.testing.assert_allclose(x[0].asnumpy(), expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    assert y[:5].asnumpy().tolist() == digits.test.y[:5].tolist()
    no_split = make_loaders(digits, cfg, seed=0, split=False)
    assert no_split.w is None and no_split.lam is None and len(no_split.train) == 14


def test_loader_split_parts_follow_ratio(digits):
    loaders = make_loaders(digits, DataConfig(split_ratio=[4, 1], batch_size=10), seed=1, split=True)
    assert (len(loaders.w), len(loaders.lam)) == (115, 28)   # 1150 and 288 of 1438 images


def test_training_set_smaller_than_a_batch(digits):
    with pytest.raises(DataError, match="batch_size"):
        make_loaders(digits, DataConfig(batch_size=1000), seed=0, split=True)


def test_pad_crop_is_a_shifted_window():
    img = np.arange(1, 8 * 8 * 3 + 1, dtype=np.uint8).reshape(8, 8, 3)   # no zeros: padding is visible
    np.random.seed(0)
    for _ in range(10):
        out = RandomPadCrop(4)(img)
        assert out.shape == img.shape
        rows, cols = np.nonzero(out[..., 0] != 0)
        block = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert any(np.array_equal(block, img[i:i + block.shape[0], j:j + block.shape[1]])
                   for i in range(9 - block.shape[0]) for j in range(9 - block.shape[1]))


def test_cutout_zeroes_one_square_per_image():
    np.random.seed(1)
    out = Cutout(16)(mx.nd.ones((32, 3, 32, 32))).asnumpy()
    for image in out:
        assert np.array_equal(image[0], image[1]) and np.array_equal(image[0], image[2])
        rows, cols = np.nonzero(image[0] == 0)
        assert 64 <= len(rows) <= 256                      # clipped at the border: between 8x8 and 16x16
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert len(rows) == height * width and max(height, width) <= 16
    assert (out == 0).mean() > 0.1


def test_cutout_in_the_training_loader(digits):
    loaders = make_loaders(digits, DataConfig(cutout=8), seed=0, split=False)
    x, _ = next(iter(loaders.train))
    assert ((x == 0).sum(axis=(1, 2, 3)) >= 3 * 16).asnumpy().all()
