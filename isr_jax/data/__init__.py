"""Datasets in memory, federated partitions of them, and packing into client arrays."""

from isr_jax.data.datasets import (
    DATASETS,
    EMNIST_CONFIGS,
    FASHION_MNIST_DIR,
    SEGMENTATION_DATASETS,
    ArraySplit,
    DatasetInfo,
    load_dataset,
    standardize_splits,
)
from isr_jax.data.holdout import split_clients, split_cloud
from isr_jax.data.packing import ClientData, pack_clients
from isr_jax.data.partition import PARTITION_METHODS, PARTITIONS, dominant_class, partition
from isr_jax.data.ragged import RaggedClients, gather_rows, ragged_clients

__all__ = [
    "DATASETS",
    "EMNIST_CONFIGS",
    "FASHION_MNIST_DIR",
    "PARTITIONS",
    "PARTITION_METHODS",
    "SEGMENTATION_DATASETS",
    "ArraySplit",
    "ClientData",
    "DatasetInfo",
    "RaggedClients",
    "dominant_class",
    "gather_rows",
    "load_dataset",
    "pack_clients",
    "partition",
    "ragged_clients",
    "split_clients",
    "split_cloud",
    "standardize_splits",
]
