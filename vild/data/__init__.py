"""Datasets, open-vocabulary splits, transforms, the CLIP proposal store and data loaders."""
from .catalog import DatasetMeta, datasets_root, get_dataset_meta, list_datasets, register_dataset
from .dataset import DetectionDataset
from .loader import batch_to_device, build_dataset, build_test_loader, build_train_loader, trivial_collate
from .proposal_store import ProposalStore, ProposalStoreWriter
from .splits import COCO_OVD_BASE, COCO_OVD_NOVEL, apply_split
from .transforms import build_transforms

__all__ = [
    "DatasetMeta", "datasets_root", "get_dataset_meta", "list_datasets", "register_dataset", "DetectionDataset",
    "batch_to_device", "build_dataset", "build_test_loader", "build_train_loader", "trivial_collate", "ProposalStore",
    "ProposalStoreWriter", "COCO_OVD_BASE", "COCO_OVD_NOVEL", "apply_split", "build_transforms",
]
