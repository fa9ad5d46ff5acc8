"""The store writer's input: one decode per loader task, regrouped into batches in order."""
import torch

from vild.engine.precompute import batches_of, collate_readable, image_loader


class _Items(torch.utils.data.Dataset):
    """(image, target) pairs; every third item unreadable (None), as the datasets return it."""

    def __len__(self) -> int:
        return 11

    def __getitem__(self, i: int):
        return None if i % 3 == 2 else (torch.full((3, 4, 4), i, dtype=torch.uint8), {"image_id": i})


def test_worker_loader_keeps_order_and_regroups_into_batches():
    loader = image_loader(_Items(), batch_size=4, num_workers=2, pin_memory=False)
    # two batches in flight: the first batch is decoded by all workers at once, not by one
    assert loader.num_workers * loader.prefetch_factor >= 2 * 4
    batches = list(batches_of(loader, 4, collate_readable))
    readable = [i for i in range(11) if i % 3 != 2]
    ids = [[t["image_id"] for t in targets] for _, targets in batches]
    assert ids == [[0, 1, 3], [4, 6, 7], [9, 10]]  # runs of 4 dataset items, the unreadable ones left out
    assert [int(im[0, 0, 0]) for images, _ in batches for im in images] == readable


def test_batches_of_in_process():
    assert list(batches_of(range(5), 2, list)) == [[0, 1], [2, 3], [4]]
    assert list(batches_of([], 3, list)) == []
    items = list(image_loader(_Items(), batch_size=2, num_workers=0, pin_memory=False))
    assert len(items) == 11 and items[2] is None and items[0][1]["image_id"] == 0
