"""Fashion-MNIST loading: IDX files (gzipped and plain), bad files, missing data."""

import gzip
import os

import numpy as np
import pytest

from tf_pfq import data


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(directory, n_train=12, n_test=6, compress=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 3) % 10,
    }
    for name, array in arrays.items():
        path = os.path.join(directory, name + (".gz" if compress else ""))
        opener = gzip.open if compress else open
        with opener(path, "wb") as f:
            f.write(_idx_bytes(array))
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_reads_back_what_was_written(tmp_path, compress):
    arrays = _write_fashion(str(tmp_path), compress=compress)
    splits = data.load_fashion_mnist(str(tmp_path))
    assert set(splits) == {"train", "test"}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = arrays[f"{prefix}-images-idx3-ubyte"]
        labels = arrays[f"{prefix}-labels-idx1-ubyte"]
        got = splits[split]
        assert got.images.shape == (len(labels), 28, 28, 1)
        assert got.images.dtype == np.float32 and got.labels.dtype == np.int64
        # The split is a permutation of the file's examples, each image with its label.
        for image, label in zip(got.images, got.labels):
            match = np.flatnonzero((np.abs(images / 255.0 - image[..., 0]) < 1e-6).all(axis=(1, 2)))
            assert len(match) == 1 and labels[match[0]] == label


def test_subsets_validation_resize_and_channels(tmp_path):
    _write_fashion(str(tmp_path))
    splits = data.load_fashion_mnist(
        str(tmp_path), image_size=16, channels=3, num_train=8, num_val=3, num_test=4
    )
    assert splits["train"].images.shape == (5, 16, 16, 3)
    assert splits["validation"].images.shape == (3, 16, 16, 3)
    assert splits["test"].images.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(splits["train"].images[..., 0], splits["train"].images[..., 2])
    again = data.load_fashion_mnist(str(tmp_path), num_train=8, num_val=3, num_test=4)
    np.testing.assert_array_equal(again["validation"].labels, splits["validation"].labels)


def test_bad_magic_names_the_file(tmp_path):
    _write_fashion(str(tmp_path), compress=False)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 6]) + bytes(24))  # float type code
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte is not an unsigned-byte IDX"):
        data.load_fashion_mnist(str(tmp_path))


def test_size_mismatch_names_the_file(tmp_path):
    _write_fashion(str(tmp_path), compress=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte holds 10 data bytes"):
        data.load_fashion_mnist(str(tmp_path))


def test_images_and_labels_must_agree(tmp_path):
    _write_fashion(str(tmp_path), compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(5)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte and .*train-labels"):
        data.load_fashion_mnist(str(tmp_path))


def test_missing_files_give_both_install_routes(tmp_path, monkeypatch):
    # tfds must not find a prepared copy in its default directory either.
    monkeypatch.setattr(data, "_fashion_from_tfds", lambda data_dir: None)
    with pytest.raises(FileNotFoundError) as error:
        data.load_fashion_mnist(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "tfds" in message


def test_falls_back_to_tfds_when_files_are_missing(tmp_path, monkeypatch):
    images = np.full((4, 28, 28), 51, np.uint8)
    seen = []

    def fake_tfds(data_dir):
        seen.append(data_dir)
        return {"train": (images, np.arange(4)), "test": (images[:2], np.arange(2))}

    monkeypatch.setattr(data, "_fashion_from_tfds", fake_tfds)
    splits = data.load_fashion_mnist(str(tmp_path))
    assert seen == [str(tmp_path)]
    assert len(splits["train"]) == 4 and len(splits["test"]) == 2
    np.testing.assert_allclose(splits["train"].images, 0.2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`channels` must be 1 or 3"):
        data.load_fashion_mnist(channels=2)
    with pytest.raises(ValueError, match="`num_train` must be in"):
        data.load_fashion_mnist(num_train=0)
    with pytest.raises(ValueError, match="`num_test` must be in"):
        data.load_fashion_mnist(num_test=10001)


def test_debian_package_files_load():
    # The test command installs Debian's dataset-fashion-mnist; the real files are
    # what the accuracy benchmark reads.
    assert os.path.isdir(data.FASHION_MNIST_DIR), (
        f"{data.FASHION_MNIST_DIR} is missing: apt-get install -y dataset-fashion-mnist"
    )
    splits = data.load_fashion_mnist()
    assert splits["train"].images.shape == (60000, 28, 28, 1)
    assert splits["test"].images.shape == (10000, 28, 28, 1)
    assert splits["train"].images.min() >= 0.0 and splits["train"].images.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(splits["train"].labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(splits["test"].labels), np.full(10, 1000))
