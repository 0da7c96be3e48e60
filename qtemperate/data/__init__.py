"""Datasets, deterministic splits and reproducible loaders.

The package has one module per concept:

- :mod:`~qtemperate.data.formats`: on-disk formats (IDX, CIFAR pickle batches, gzip).
- :mod:`~qtemperate.data.splits`: labels, class-balanced limits, stratified
  hold-outs, normalisation.
- :mod:`~qtemperate.data.augment`: seeded tensor augmentation.
- :mod:`~qtemperate.data.datasets`: the :data:`DATASETS` registry, the facts a
  dataset states (:class:`DatasetInfo`), :func:`build_datasets`, :func:`dataset_info`.
- :mod:`~qtemperate.data.builtin`: the built-in datasets, each builder next to its facts.
- :mod:`~qtemperate.data.detection`: datasets with named targets beyond the class
  label, and the ``synthetic_detection`` shapes (class and box known).
- :mod:`~qtemperate.data.loaders`: epoch-seeded samplers and the loaders of a run
  (:func:`build_run_loaders`).
- :mod:`~qtemperate.data.sharding`: the samplers of a data-parallel run (each rank's
  share of every global batch; contiguous evaluation shards).

Data order is a pure function of ``(seed, epoch)`` (:class:`EpochSeededSampler`)
and so is augmentation (:class:`AugmentedTensorDataset`), so a run resumed at
epoch ``e`` sees exactly the batches an uninterrupted run would have seen.
Importing this package loads neither torchvision nor scikit-learn.
"""

from qtemperate.data.augment import AugmentedTensorDataset as AugmentedTensorDataset
from qtemperate.data.augment import epoch_seed as epoch_seed
from qtemperate.data.builtin import CIFAR10_ENV as CIFAR10_ENV
from qtemperate.data.builtin import CIFAR10_INFO as CIFAR10_INFO
from qtemperate.data.builtin import CIFAR10_MEAN as CIFAR10_MEAN
from qtemperate.data.builtin import CIFAR10_STD as CIFAR10_STD
from qtemperate.data.builtin import CIFAR100_ENV as CIFAR100_ENV
from qtemperate.data.builtin import CIFAR100_LABEL_MODES as CIFAR100_LABEL_MODES
from qtemperate.data.builtin import CIFAR100_MEAN as CIFAR100_MEAN
from qtemperate.data.builtin import CIFAR100_STD as CIFAR100_STD
from qtemperate.data.builtin import DIGITS_INFO as DIGITS_INFO
from qtemperate.data.builtin import DIGITS_MEAN as DIGITS_MEAN
from qtemperate.data.builtin import DIGITS_STD as DIGITS_STD
from qtemperate.data.builtin import FASHION_MNIST_ENV as FASHION_MNIST_ENV
from qtemperate.data.builtin import FASHION_MNIST_INFO as FASHION_MNIST_INFO
from qtemperate.data.builtin import FASHION_MNIST_MEAN as FASHION_MNIST_MEAN
from qtemperate.data.builtin import FASHION_MNIST_STD as FASHION_MNIST_STD
from qtemperate.data.builtin import FASHION_MNIST_SYSTEM_DIR as FASHION_MNIST_SYSTEM_DIR
from qtemperate.data.builtin import IMAGENET_ENV as IMAGENET_ENV
from qtemperate.data.builtin import IMAGENET_MEAN as IMAGENET_MEAN
from qtemperate.data.builtin import IMAGENET_STD as IMAGENET_STD
from qtemperate.data.builtin import SYNTHETIC_DEFAULTS as SYNTHETIC_DEFAULTS
from qtemperate.data.builtin import resolve_fashion_mnist_root as resolve_fashion_mnist_root
from qtemperate.data.datasets import DATASETS as DATASETS
from qtemperate.data.datasets import DataBundle as DataBundle
from qtemperate.data.datasets import DatasetInfo as DatasetInfo
from qtemperate.data.datasets import DatasetOptionError as DatasetOptionError
from qtemperate.data.datasets import DatasetSpec as DatasetSpec
from qtemperate.data.datasets import RawSplits as RawSplits
from qtemperate.data.datasets import build_datasets as build_datasets
from qtemperate.data.datasets import check_data_available as check_data_available
from qtemperate.data.datasets import dataset_info as dataset_info
from qtemperate.data.detection import NamedTargetsDataset as NamedTargetsDataset
from qtemperate.data.formats import load_cifar_batch as load_cifar_batch
from qtemperate.data.formats import read_idx as read_idx
from qtemperate.data.loaders import EpochSeededSampler as EpochSeededSampler
from qtemperate.data.loaders import IndexedDataset as IndexedDataset
from qtemperate.data.loaders import RunLoaders as RunLoaders
from qtemperate.data.loaders import build_run_loaders as build_run_loaders
from qtemperate.data.loaders import epoch_loader as epoch_loader
from qtemperate.data.loaders import make_loaders as make_loaders
from qtemperate.data.loaders import set_loader_epoch as set_loader_epoch
from qtemperate.data.sharding import DistributedEpochSampler as DistributedEpochSampler
from qtemperate.data.sharding import ShardSampler as ShardSampler
from qtemperate.data.splits import dataset_targets as dataset_targets
from qtemperate.data.splits import stratified_first_n as stratified_first_n
from qtemperate.data.splits import stratified_holdout as stratified_holdout

__all__ = [
    "CIFAR10_ENV",
    "CIFAR10_INFO",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_ENV",
    "CIFAR100_LABEL_MODES",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "DIGITS_INFO",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_INFO",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGENET_ENV",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_DEFAULTS",
    "AugmentedTensorDataset",
    "DataBundle",
    "DatasetInfo",
    "DatasetOptionError",
    "DatasetSpec",
    "DistributedEpochSampler",
    "EpochSeededSampler",
    "IndexedDataset",
    "NamedTargetsDataset",
    "RawSplits",
    "RunLoaders",
    "ShardSampler",
    "build_datasets",
    "build_run_loaders",
    "check_data_available",
    "dataset_info",
    "dataset_targets",
    "epoch_loader",
    "epoch_seed",
    "load_cifar_batch",
    "make_loaders",
    "read_idx",
    "resolve_fashion_mnist_root",
    "set_loader_epoch",
    "stratified_first_n",
    "stratified_holdout",
]
