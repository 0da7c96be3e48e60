"""Tests of qtemperate.data.datasets: builders, their stated facts, options, registration."""

from __future__ import annotations

import builtins
import pathlib
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from qtemperate import data as D
from qtemperate.recipe import RecipeError, parse_recipe
from tests.data.fakes import FASHION_DIR, fake_cifar10, fake_cifar100, fake_fashion

# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_fake_tree_normalisation_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = fake_fashion(tmp_path / "fm", gz=False)
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


# --------------------------------------------------------------------------- digits


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


def test_cifar10_pickle_tree(tmp_path: Path) -> None:
    batches = fake_cifar10(tmp_path)
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
    fake_cifar10(tmp_path)
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


# --------------------------------------------------------------------------- facts


def _fashion_root(tmp_path: Path) -> Path:
    fake_fashion(tmp_path / "fm", n_train=20, n_test=10)
    return tmp_path / "fm"


def _cifar10_root(tmp_path: Path) -> Path:
    fake_cifar10(tmp_path)
    return tmp_path


def _cifar100_root(tmp_path: Path) -> Path:
    fake_cifar100(tmp_path)
    return tmp_path


def _no_root(tmp_path: Path) -> None:
    return None


BUILDABLE: list[tuple[str, dict[str, Any], Callable[[Path], Path | None]]] = [
    ("digits", {}, _no_root),
    ("digits", {"test_fraction": 0.3}, _no_root),
    ("fashion_mnist", {}, _fashion_root),
    ("synthetic", {"n_train": 20, "n_test": 10}, _no_root),
    ("synthetic", {"num_classes": 4, "in_channels": 3, "image_size": 12, "n_train": 8, "n_test": 4}, _no_root),
    ("synthetic", {"image_size": [10, 6], "n_train": 20, "n_test": 10}, _no_root),
    ("cifar10", {}, _cifar10_root),
    ("cifar100", {}, _cifar100_root),
    ("cifar100", {"label_mode": "fine"}, _cifar100_root),
    ("cifar100", {"label_mode": "coarse"}, _cifar100_root),
]


@pytest.mark.parametrize(
    ("name", "options", "make_root"), BUILDABLE, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}" for n, o, _ in BUILDABLE]
)
def test_stated_facts_equal_what_the_builder_makes(
    tmp_path: Path, name: str, options: dict[str, Any], make_root: Callable[[Path], Path | None]
) -> None:
    stated = D.dataset_info(name, options)
    bundle = D.build_datasets(name, root=make_root(tmp_path), **options)
    assert stated == bundle.info
    assert stated == D.DatasetInfo(bundle.num_classes, bundle.in_channels, bundle.image_size)
    assert bundle.test[0][0].shape == stated.input_shape == bundle.input_shape


def test_every_builtin_dataset_states_its_facts() -> None:
    for name in ("fashion_mnist", "digits", "cifar10", "cifar100", "imagenet", "synthetic"):
        assert D.DATASETS.get(name).info is not None, name
        assert isinstance(D.dataset_info(name), D.DatasetInfo)


def test_cifar100_coarse_has_20_classes() -> None:
    assert D.dataset_info("cifar100").num_classes == 100
    assert D.dataset_info("cifar100", {"label_mode": "fine"}).num_classes == 100
    assert D.dataset_info("cifar100", {"label_mode": "coarse"}) == D.DatasetInfo(20, 3, (32, 32))


def test_facts_of_option_driven_datasets() -> None:
    assert D.dataset_info("synthetic") == D.DatasetInfo(10, 1, (16, 16))
    assert D.dataset_info("synthetic", {"num_classes": 3, "in_channels": 2, "image_size": 9}) == D.DatasetInfo(3, 2, (9, 9))
    assert D.dataset_info("imagenet") == D.DatasetInfo(1000, 3, (224, 224))
    assert D.dataset_info("imagenet", {"image_size": 160, "resize": 182}) == D.DatasetInfo(1000, 3, (160, 160))
    assert D.dataset_info("imagenet", {"num_classes": 10}).num_classes == 10
    assert D.dataset_info("fashion_mnist") == D.DatasetInfo(10, 1, (28, 28))
    assert D.dataset_info("digits") == D.DatasetInfo(10, 1, (8, 8))
    assert D.dataset_info("cifar10") == D.DatasetInfo(10, 3, (32, 32))


@pytest.fixture
def no_file_access(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open or stat a file fails."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"file access: {args[:1]}")

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", refuse)
        for attr in ("is_file", "is_dir", "exists", "open", "read_bytes", "iterdir"):
            m.setattr(pathlib.Path, attr, refuse)
        m.delenv(D.CIFAR100_ENV, raising=False)
        yield


def test_dataset_info_reads_no_data(no_file_access: None) -> None:
    for name in ("fashion_mnist", "digits", "cifar10", "cifar100", "imagenet", "synthetic"):
        D.dataset_info(name)
    assert D.dataset_info("cifar100", {"label_mode": "coarse"}).num_classes == 20


# --------------------------------------------------------------------------- options


def test_unknown_option_is_named_with_the_accepted_ones(tmp_path: Path) -> None:
    with pytest.raises(D.DatasetOptionError, match=r"dataset 'cifar100' has no option 'label_mod'; accepted: label_mode$") as info:
        D.dataset_info("cifar100", {"label_mod": "coarse"})
    assert info.value.option == "label_mod" and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match=r"'imagenet' has no option 'augment'; accepted: image_size, num_classes, resize"):
        D.dataset_info("imagenet", {"augment": True})  # data.augment is the recipe's switch
    with pytest.raises(ValueError, match=r"'fashion_mnist' has no option 'n_train'; accepted: \(none\)"):
        D.dataset_info("fashion_mnist", {"n_train": 5})
    with pytest.raises(ValueError, match=r"'synthetic' has no option 'classes'; accepted: image_size, in_channels, n_test, n_train, noise, num_classes"):
        D.build_datasets("synthetic", classes=3)
    # Options are checked before any file is read.
    fake_cifar10(tmp_path)
    with pytest.raises(D.DatasetOptionError, match="'cifar10' has no option 'label_mode'") as info:
        D.build_datasets("cifar10", root=tmp_path / "missing", label_mode="coarse")
    assert info.value.option == "label_mode"


def test_bad_label_mode_is_an_option_error() -> None:
    with pytest.raises(D.DatasetOptionError, match="cifar100 label_mode must be 'fine' or 'coarse', got 'medium'") as info:
        D.dataset_info("cifar100", {"label_mode": "medium"})
    assert info.value.option == "label_mode"


def test_spec_options_come_from_the_builder_signature() -> None:
    assert D.DATASETS.get("cifar100").options == ("label_mode",)
    assert D.DATASETS.get("digits").options == ("test_fraction",)
    assert D.DATASETS.get("imagenet").options == ("image_size", "num_classes", "resize")
    assert D.DatasetSpec(lambda root, seed, **kw: None).options is None  # takes anything


# --------------------------------------------------------------------------- registration


def _build_blobs(root: Any, seed: int, num_classes: int = 3, size: int = 6) -> D.RawSplits:
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> TensorDataset:
        y = torch.arange(n) % num_classes
        return TensorDataset(y.view(-1, 1, 1, 1).float() + torch.randn(n, 1, size, size, generator=gen), y)

    return D.RawSplits(split(4 * num_classes), split(2 * num_classes), num_classes, 1, (size, size), (0.0,), (1.0,), scale=None)


def _blobs_info(num_classes: int = 3, size: int = 6) -> D.DatasetInfo:
    return D.DatasetInfo(num_classes, 1, (size, size))


@pytest.fixture
def blobs() -> Iterator[str]:
    """A user dataset ``test_blobs``, registered for one test."""
    D.DATASETS.register("test_blobs", D.DatasetSpec(build=_build_blobs, info=_blobs_info, crop_pad=1))
    try:
        yield "test_blobs"
    finally:
        D.DATASETS.unregister("test_blobs")


def _recipe(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "user-data",
        "data": data,
        "teacher": {"model": "small_cnn", "train": {"epochs": 1}},
        "stages": [{"epochs": 1, "weight_bits": 8, "act_bits": 8}],
    }


def test_user_dataset_is_usable_from_a_recipe_by_name(blobs: str) -> None:
    recipe = parse_recipe(_recipe({"name": blobs, "kwargs": {"num_classes": 5}}))
    d = recipe.data
    assert d.name == blobs
    assert D.dataset_info(d.name, d.kwargs) == D.DatasetInfo(5, 1, (6, 6))
    bundle = D.build_datasets(d.name, root=d.root, seed=recipe.seed, augment=True, **d.kwargs)
    assert bundle.num_classes == 5 and bundle.class_counts == [4] * 5 and bundle.augmented
    assert bundle.info == D.dataset_info(d.name, d.kwargs)


def test_unknown_dataset_is_rejected_by_the_recipe() -> None:
    assert "test_blobs" not in D.DATASETS
    with pytest.raises(RecipeError, match=r"data\.name: unknown dataset 'test_blobs'; known: cifar10, cifar100, digits"):
        parse_recipe(_recipe({"name": "test_blobs"}))


def test_dataset_without_facts_builds_but_has_no_info() -> None:
    D.DATASETS.register("test_factless", D.DatasetSpec(_build_blobs))
    try:
        assert D.build_datasets("test_factless").num_classes == 3
        with pytest.raises(ValueError, match=r"'test_factless' was registered without facts: register it as DatasetSpec\(build=\.\.\., info=\.\.\.\)"):
            D.dataset_info("test_factless")
    finally:
        D.DATASETS.unregister("test_factless")


def test_builder_that_disagrees_with_its_facts_is_caught() -> None:
    wrong = D.DatasetSpec(build=_build_blobs, info=lambda num_classes=3, size=6: D.DatasetInfo(num_classes + 1, 1, (size, size)))
    D.DATASETS.register("test_drift", wrong)
    try:
        with pytest.raises(ValueError, match=r"'test_drift': the builder made .*num_classes=3.* but info\(\) states .*num_classes=4"):
            D.build_datasets("test_drift")
    finally:
        D.DATASETS.unregister("test_drift")


def test_built_labels_beyond_the_class_count_are_caught(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10 if name == "test_batch" else 1]}
        (folder / name).write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"'cifar10': test labels span 0\.\.10 but it has 10 classes"):
        D.build_datasets("cifar10", root=tmp_path)


# --------------------------------------------------------------------------- the package


def test_package_exports_the_former_module_names() -> None:
    former = {
        "DATASETS", "FASHION_MNIST_ENV", "FASHION_MNIST_SYSTEM_DIR", "SYNTHETIC_DEFAULTS",
        "AugmentedTensorDataset", "DataBundle", "DatasetSpec", "EpochSeededSampler", "RawSplits",
        "build_datasets", "check_data_available", "dataset_targets", "epoch_loader", "epoch_seed",
        "make_loaders", "read_idx", "resolve_fashion_mnist_root", "set_loader_epoch", "stratified_first_n",
        "CIFAR10_ENV", "CIFAR100_ENV", "IMAGENET_ENV", "CIFAR10_MEAN", "CIFAR10_STD",
    }
    assert former <= set(D.__all__)
    assert all(getattr(D, name) is not None for name in D.__all__)


def test_import_loads_neither_torchvision_nor_sklearn() -> None:
    import subprocess
    import sys

    code = "import sys, qtemperate.data; print(','.join(m for m in ('torchvision', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _build_self_augmenting(root: Any, seed: int, augment: bool = False) -> D.RawSplits:
    """A lazy-style builder that augments its own train split: augmented images are +100."""
    y = torch.arange(40) % 4
    x = torch.zeros(40, 1, 4, 4) + (100.0 if augment else 0.0)
    test = TensorDataset(torch.zeros(8, 1, 4, 4), torch.arange(8) % 4)
    return D.RawSplits(TensorDataset(x, y), test, 4, 1, (4, 4), (0.0,), (1.0,), scale=None)


def test_validation_split_is_never_augmented() -> None:
    D.DATASETS.register("test_selfaug", D.DatasetSpec(build=_build_self_augmenting, builder_augments=True,
                                                      info=lambda: D.DatasetInfo(4, 1, (4, 4))))
    try:
        b = D.build_datasets("test_selfaug", val_fraction=0.25, augment=True, seed=1)
        assert len(b.val) == 8 and len(b.train) == 32  # 2 of each class's 10 held out
        assert float(b.val.tensors[0].abs().max()) == 0.0  # plain images
        assert float(b.train.tensors[0].min()) == 100.0  # the training split stays augmented
        assert sorted(b.val.tensors[1].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    finally:
        D.DATASETS.unregister("test_selfaug")
