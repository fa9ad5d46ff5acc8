"""Figure 4, precompute: the proposal-store writer against ``encode_image`` on the same number of ready crops."""
from __future__ import annotations

import torch
from common import interleaved, log, median, random_boxes

from .context import Context, rate, target


def precompute(ctx: Context) -> dict:
    """Proposal-store writer path (decode, crop, embed 1x + 1.5x, write) vs raw encode_image on ready crops."""
    import cv2
    import numpy as np

    from vild.data import ProposalStoreWriter
    from vild.engine.precompute import batches_of, embed_into_store, image_loader
    a, dev = ctx.args, ctx.device
    teacher = ctx.teacher()
    n_img, p = a.precompute_images, a.precompute_proposals
    tmp = ctx.scratch_dir("store")
    rng = np.random.default_rng(0)
    files, boxes = [], []
    for i in range(n_img):
        # smooth random "photos" (noise decodes unlike real JPEGs); a JPEG like the datasets' files
        small = rng.integers(0, 256, (a.size // 16 + 1, a.size // 16 + 1, 3), dtype=np.uint8)
        img = cv2.GaussianBlur(cv2.resize(small, (a.size, a.size), interpolation=cv2.INTER_CUBIC), (5, 5), 0)
        path = tmp / f"{i:06d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        files.append(str(path))
        boxes.append(random_boxes(p, a.size, a.size, seed=i))
    rounds = a.warmup + a.repeats
    writers = [ProposalStoreWriter(tmp / f"store_{r}", 0, 1, list(range(n_img)), p, teacher.embed_dim,
                                   teacher=teacher.identity, crop_scales=list(teacher.crop_scales))
               for r in range(rounds)]

    pipeline_stats: list[dict] = []
    loader = image_loader(_JpegFiles(files), a.precompute_batch, a.precompute_workers, pin_memory=ctx.cuda,
                          persistent_workers=a.precompute_workers > 0)

    def writer_path():
        # the precompute tool's own loop (vild.engine.precompute.embed_into_store): decoding in loader
        # workers, crops by roi_align on the device, store writes on a background thread
        w = writers.pop(0)
        st: dict = {}
        embed_into_store(batches_of(loader, a.precompute_batch, _jpeg_collate), teacher, w,
                         lambda ids, images: [boxes[i] for i in ids], stats=st)
        w.close()
        pipeline_stats.append({k: round(v, 4) for k, v in st.items()})

    n_crops = n_img * p * len(teacher.crop_scales)
    h, w_ = teacher.image_size
    torch.manual_seed(0)
    ready = (torch.rand(n_crops, 3, h, w_, device=dev) - teacher.mean) / teacher.std

    def encode_image():
        with torch.inference_mode():
            for s in range(0, n_crops, teacher.batch_size):
                with teacher.autocast():
                    teacher.model.encode_image(ready[s:s + teacher.batch_size])

    times = interleaved({"writer": writer_path, "encode_image": encode_image}, dev, a.repeats, a.warmup,
                        label="precompute")
    # where the writer's extra time goes: the crops alone and embed_regions alone, on images already on the device
    decoded = [im.to(dev) for _, im in loader]

    def crops_only():
        for _ in teacher.region_crops(decoded, boxes):
            pass

    parts = interleaved({"crops_only": crops_only, "embed_regions": lambda: teacher.embed_regions(decoded, boxes)},
                        dev, max(1, a.repeats // 2), 1, label="precompute parts")
    ips_writer = rate(n_img, times["writer"])
    ips_raw = rate(n_img, times["encode_image"])
    ratio = ips_writer / ips_raw
    log(f"precompute: writer {ips_writer:.3f} img/s, encode_image on the same crops {ips_raw:.3f} img/s, "
        f"ratio {ratio:.2f}")
    return {"size": a.size, "clip_model": a.clip_model, "images": n_img, "proposals_per_image": p,
            "crops_per_image": p * len(teacher.crop_scales), "durable_writes": True,
            "writer": {"images_per_s": round(ips_writer, 4), "crops_per_s": round(ips_writer * n_crops / n_img, 2),
                       "seconds": [round(t, 4) for t in times["writer"]]},
            "encode_image": {"images_per_s": round(ips_raw, 4), "crops_per_s": round(ips_raw * n_crops / n_img, 2),
                             "seconds": [round(t, 4) for t in times["encode_image"]]},
            "ratio": round(ratio, 3), "target": target(0.7, ratio),
            "loader_workers": a.precompute_workers, "images_per_batch": a.precompute_batch,
            "writer_stage_seconds": pipeline_stats[-a.repeats:],
            "parts_seconds": {k: round(median(v), 4) for k, v in parts.items()},
            "note": "random proposal boxes (no RPN: the figure is the store-writing path)"}


class _JpegFiles(torch.utils.data.Dataset):
    """(index, RGB uint8 [3, H, W]) for each JPEG file, decoded with OpenCV as the datasets do."""

    def __init__(self, files: list[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import cv2
        arr = cv2.imread(self.files[i], cv2.IMREAD_COLOR)
        return i, torch.from_numpy(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()


def _jpeg_collate(items):
    return [i for i, _ in items], [im for _, im in items]
