"""Tests of qtemperate.data: file formats, splits, normalisation, augmentation, order."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qtemperate import data as D

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = {3: 2051, 1: 2049}[array.ndim]
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    raw = _idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_images_and_labels(tmp_path: Path, gz: bool) -> None:
    images = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4) * 7
    labels = np.array([4, 0, 9], dtype=np.uint8)
    pi = _write_idx(tmp_path / "img-idx3-ubyte", images, gz)
    pl = _write_idx(tmp_path / "lab-idx1-ubyte", labels, gz)
    got_i = D.read_idx(pi, expected_ndim=3)
    got_l = D.read_idx(pl, expected_ndim=1)
    assert got_i.dtype == torch.uint8 and got_i.shape == (3, 2, 4)
    assert got_i.tolist() == images.tolist()
    assert got_l.tolist() == [4, 0, 9]


def test_read_idx_bad_magic_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(struct.pack(">IIII", 0x12345678, 1, 1, 1) + b"\x00")
    with pytest.raises(ValueError, match=r"bad-idx3-ubyte.*magic number 305419896"):
        D.read_idx(bad)


def test_read_idx_wrong_ndim_and_truncated(tmp_path: Path) -> None:
    p = _write_idx(tmp_path / "lab", np.array([1, 2, 3], dtype=np.uint8), gz=False)
    with pytest.raises(ValueError, match="expected 3"):
        D.read_idx(p, expected_ndim=3)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"lab.*holds 2 bytes"):
        D.read_idx(p)


def _fake_fashion(root: Path, n_train: int = 30, n_test: int = 20, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        _write_idx(root / name, arr, gz)
    return arrays


def test_fashion_fake_tree_normalisation_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _fake_fashion(tmp_path / "fm", gz=False)
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path / "fm"))
    b = D.build_datasets("fashion_mnist")
    x, y = b.train.tensors
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (arrays["train-images-idx3-ubyte"].astype(np.float64) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(x[:, 0].numpy(), expected, rtol=0, atol=1e-5)
    assert y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert b.test.tensors[1].tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert b.class_counts == [3] * 10
    assert (b.num_classes, b.in_channels, b.image_size, b.augmented) == (10, 1, (28, 28), False)


def test_fashion_missing_dir_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        D.build_datasets("fashion_mnist", root=missing)
    msg = str(info.value)
    assert str(missing) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert D.FASHION_MNIST_ENV in msg
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.check_data_available("fashion_mnist")


@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"
)
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.FASHION_MNIST_ENV, raising=False)
    D.check_data_available("fashion_mnist")
    b = D.build_datasets("fashion_mnist")
    assert b.train.tensors[0].shape == (60000, 1, 28, 28)
    assert b.test.tensors[0].shape == (10000, 1, 28, 28)
    assert b.class_counts == [6000] * 10
    assert torch.bincount(b.test.tensors[1]).tolist() == [1000] * 10
    assert b.train.tensors[1][0].item() == 9  # the first training image is an ankle boot
    # The fixed constants really standardise the training set.
    x = b.train.tensors[0]
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


# --------------------------------------------------------------------------- splits


def test_stratified_first_n_matches_brute_force() -> None:
    labels = torch.tensor([0, 0, 1, 2, 0, 1, 1, 2, 2, 2, 0, 1])
    got = D.stratified_first_n(labels, 7, 3).tolist()
    # Round-robin by rank within class: ranks 0 of classes 0,1,2, ranks 1 of 0,1,2, rank 2 of class 0.
    by_class = {c: [i for i, lab in enumerate(labels.tolist()) if lab == c] for c in range(3)}
    picked = [by_class[c][r] for r in range(3) for c in range(3) if r < len(by_class[c])][:7]
    assert got == sorted(picked)
    assert D.stratified_first_n(labels, 100, 3).tolist() == list(range(12))


def test_limits_and_val_split(tmp_path: Path) -> None:
    _fake_fashion(tmp_path, n_train=40, n_test=20)
    b = D.build_datasets("fashion_mnist", root=tmp_path, limit_train=20, limit_test=10, val_fraction=0.5, seed=3)
    full = D.build_datasets("fashion_mnist", root=tmp_path)
    keep = D.stratified_first_n(full.train.tensors[1], 20, 10)
    limited_x = full.train.tensors[0][keep]
    assert len(b.train) + len(b.val) == 20 and len(b.val) == 10  # 2 per class, 1 held out each
    assert b.class_counts == [1] * 10 and len(b.test) == 10
    union = torch.cat([b.train.tensors[0], b.val.tensors[0]])
    # Every kept sample appears exactly once across train+val.
    matches = (union.flatten(1)[:, None] == limited_x.flatten(1)[None]).all(-1)
    assert matches.sum(0).tolist() == [1] * 20
    again = D.build_datasets("fashion_mnist", root=tmp_path, limit_train=20, limit_test=10, val_fraction=0.5, seed=3)
    assert torch.equal(again.val.tensors[0], b.val.tensors[0])


def test_digits_shapes_values_and_deterministic_split() -> None:
    from sklearn.datasets import load_digits

    a = D.build_datasets("digits", seed=0)
    b = D.build_datasets("digits", seed=0)
    c = D.build_datasets("digits", seed=1)
    assert len(a.train) + len(a.test) == 1797
    assert a.train.tensors[0].shape[1:] == (1, 8, 8) and a.image_size == (8, 8)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(a.test.tensors[1], c.test.tensors[1])
    counts = np.bincount(load_digits().target)
    test_counts = torch.bincount(a.test.tensors[1], minlength=10).numpy()
    np.testing.assert_array_equal(test_counts, np.round(0.2 * counts))
    # Undo the normalisation: every test image is an exact sklearn image.
    raw = (a.test.tensors[0][:, 0] * 0.3760 + 0.3053) * 16
    images = torch.from_numpy(load_digits().images).float()
    dist = torch.cdist(raw.flatten(1), images.flatten(1)).min(1).values
    assert dist.max().item() < 1e-3


# --------------------------------------------------------------------------- CIFAR


def _fake_cifar10(root: Path, per_batch: int = 4, n_test: int = 3) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
        batches[name] = batch
    return batches


def test_cifar10_pickle_tree(tmp_path: Path) -> None:
    batches = _fake_cifar10(tmp_path)
    b = D.build_datasets("cifar10", root=tmp_path)
    x, y = b.train.tensors
    assert x.shape == (20, 3, 32, 32) and b.test.tensors[0].shape == (3, 3, 32, 32)
    labels = [v for i in range(1, 6) for v in batches[f"data_batch_{i}"][b"labels"]]
    assert y.tolist() == labels
    row = batches["data_batch_1"][b"data"][0].astype(np.float64)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    assert x[0, 0, 0, 1].item() == pytest.approx((row[1] / 255 - 0.4914) / 0.2470, abs=1e-5)
    assert x[0, 1, 0, 0].item() == pytest.approx((row[1024] / 255 - 0.4822) / 0.2435, abs=1e-5)
    assert x[0, 2, 1, 0].item() == pytest.approx((row[2048 + 32] / 255 - 0.4465) / 0.2616, abs=1e-5)
    assert b.in_channels == 3 and b.image_size == (32, 32)
    # The batches folder itself is accepted as root too.
    assert len(D.build_datasets("cifar10", root=tmp_path / "cifar-10-batches-py").train) == 20


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 6), ("test", 2)):
        batch = {
            b"data": np.full((n, 3072), 255, dtype=np.uint8),
            b"fine_labels": list(range(90, 90 + n)),
            b"coarse_labels": [n] * n,
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    fine = D.build_datasets("cifar100", root=tmp_path)
    assert fine.num_classes == 100 and fine.train.tensors[1].tolist() == list(range(90, 96))
    assert fine.train.tensors[0][0, 0, 0, 0].item() == pytest.approx((1 - 0.5071) / 0.2673, abs=1e-5)
    coarse = D.build_datasets("cifar100", root=tmp_path, label_mode="coarse")
    assert coarse.num_classes == 20 and coarse.test.tensors[1].tolist() == [2, 2]


def test_cifar_missing_file_named(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/test_batch"):
        D.check_data_available("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/train"):
        D.build_datasets("cifar100", root=tmp_path)


def test_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        D.check_data_available("imagenet", tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install torchvision"):
            D.check_data_available("imagenet", tmp_path)
    with pytest.raises(KeyError, match="imagenet"):
        D.build_datasets("imagenett")


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_determinism() -> None:
    kw = {"num_classes": 4, "in_channels": 3, "image_size": 12, "n_train": 40, "n_test": 8}
    a = D.build_datasets("synthetic", seed=5, **kw)
    b = D.build_datasets("synthetic", seed=5, **kw)
    c = D.build_datasets("synthetic", seed=6, **kw)
    assert a.train.tensors[0].shape == (40, 3, 12, 12) and a.test.tensors[0].shape == (8, 3, 12, 12)
    assert a.class_counts == [10] * 4 and a.input_shape == (3, 12, 12)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    # Class structure: each sample is nearer its own class mean than any other's.
    x, y = a.train.tensors
    means = torch.stack([x[y == k].mean(0) for k in range(4)]).flatten(1)
    nearest = torch.cdist(x.flatten(1), means).argmin(1)
    assert (nearest == y).float().mean().item() > 0.9


# --------------------------------------------------------------------------- augmentation


def _crops(x: torch.Tensor, pad: int, fill: torch.Tensor, flips: bool) -> list[torch.Tensor]:
    _, h, w = x.shape
    padded = F.pad(x - fill.view(-1, 1, 1), (pad, pad, pad, pad)) + fill.view(-1, 1, 1)
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out.append(crop)
            if flips:
                out.append(crop.flip(-1))
    return out


def test_augmentation_is_a_seeded_crop(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    b = D.build_datasets("cifar10", root=tmp_path, augment=True, seed=2)
    assert b.augmented and isinstance(b.train, D.AugmentedTensorDataset)
    assert b.train_plain is b.train.base and (b.train.pad, b.train.hflip) == (4, True)
    fill = torch.tensor([(0 - m) / s for m, s in zip(D.CIFAR10_MEAN, D.CIFAR10_STD)])
    seen = []
    for epoch in range(3):
        b.train.set_epoch(epoch)
        x0, y0 = b.train[0]
        candidates = _crops(b.train.base.tensors[0][0], 4, fill, flips=True)
        assert any(torch.allclose(x0, c, atol=1e-5) for c in candidates)
        assert y0 == b.train.base.tensors[1][0]
        assert torch.equal(b.train[0][0], x0)  # same (seed, epoch, index) -> same draw
        seen.append(x0)
    assert not all(torch.equal(seen[0], s) for s in seen[1:])
    again = D.build_datasets("cifar10", root=tmp_path, augment=True, seed=2)
    again.train.set_epoch(2)
    assert torch.equal(again.train[0][0], seen[2])


def test_fashion_augment_crop_only_and_unsupported(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    b = D.build_datasets("fashion_mnist", root=tmp_path, augment=True)
    assert (b.train.pad, b.train.hflip) == (2, False)
    fill = torch.tensor([(0 - 0.2860) / 0.3530])
    for i in range(5):
        assert any(torch.allclose(b.train[i][0], c, atol=1e-5) for c in _crops(b.train.base.tensors[0][i], 2, fill, False))

    D.DATASETS.register("test_no_aug", D.DatasetSpec(lambda root, seed: None))
    try:
        with pytest.raises(ValueError, match="test_no_aug"):
            D.build_datasets("test_no_aug", augment=True)
    finally:
        del D.DATASETS._entries["test_no_aug"]


# --------------------------------------------------------------------------- order


def test_epoch_seeded_sampler() -> None:
    s = D.EpochSeededSampler(50, seed=7)
    s.set_epoch(3)
    perm = list(s)
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 * 1000003 + 3)).tolist()
    assert perm == expected and sorted(perm) == list(range(50)) and len(s) == 50
    other = D.EpochSeededSampler(50, seed=7)
    other.set_epoch(3)
    assert list(other) == perm
    other.set_epoch(4)
    assert list(other) != perm


def test_loaders_reproducible_per_epoch() -> None:
    b = D.build_datasets("synthetic", n_train=64, n_test=16, augment=True)
    def batches(epoch: int) -> list[torch.Tensor]:
        tr, _ = D.make_loaders(b, batch_size=16, seed=1)
        D.set_loader_epoch(tr, epoch)
        return [x for x, _ in tr]
    def labels(epoch: int) -> list[int]:
        loader = D.epoch_loader(b.train, 16, epoch, seed=1)
        return torch.cat([y for _, y in loader]).tolist()

    first, again, later = batches(1), batches(1), batches(2)
    assert all(torch.equal(a, c) for a, c in zip(first, again))
    assert not torch.equal(first[0], later[0])
    order = D.EpochSeededSampler(64, 1)
    order.set_epoch(1)
    assert labels(1) == b.train.base.tensors[1][order.permutation()].tolist()
    _, test_loader = D.make_loaders(b, batch_size=16, eval_batch_size=5)
    assert torch.equal(torch.cat([y for _, y in test_loader]), b.test.tensors[1])
