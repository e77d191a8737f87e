"""`spotmatch train-seg`: a small U-Net learnt from alpha masks and the teacher's pseudo-masks.

The teacher (u2netp) is slow-ish and generic; the U-Net distils it into an ImageNet EfficientNet-Lite
encoder trained on this domain (rock, snow, night infrared), so it can later be fine-tuned on real
cut-outs and run batched on a GPU. Held-out images come from `split_dataset` (by encounter by
default: one burst never sits on both sides), and their IoU against the teacher is the metric.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from spotmatch.config import config_hash
from spotmatch.data.images import load_image
from spotmatch.data.splits import SplitConfig, split_dataset
from spotmatch.data.tables import Dataset, load_dataset, same_file_key
from spotmatch.device import resolve_device
from spotmatch.errors import SpotmatchError
from spotmatch.global_embed.backbones import PYPI_WEIGHTS
from spotmatch.io import write_csv_atomic, write_text_atomic
from spotmatch.segmentation.evaluate import compare_masks, summarise_iou
from spotmatch.segmentation.provider import MaskConfig, MaskProvider
from spotmatch.segmentation.unet import UNetConfig, UNetSegmenter, build_unet, save_checkpoint, to_input_tensor

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "unet.pt"


@dataclass(frozen=True)
class TrainSegConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    labels: MaskConfig = field(default_factory=MaskConfig)  # where training masks come from (alpha first, then this)
    split: SplitConfig = field(default_factory=lambda: SplitConfig(by="encounter"))
    epochs: int = 6
    batch_size: int = 8
    learning_rate: float = 1e-3
    encoder_learning_rate_factor: float = 0.3  # the ImageNet encoder moves slower than the fresh decoder
    weight_decay: float = 1e-4
    max_steps: int = 0  # > 0 stops early: smoke tests and quick looks
    max_images: int = 0  # > 0 uses only the first N training images (same reason)
    include_ambiguous: bool = True  # rows with ambiguous identity still show a cat: train on them
    imagenet_encoder: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise SpotmatchError(f"--lr {self.learning_rate}: the learning rate must be a finite number above 0, such as 1e-3")
        if self.imagenet_encoder and self.unet.encoder not in PYPI_WEIGHTS:  # only these have offline ImageNet weights
            raise SpotmatchError(f"--encoder {self.unet.encoder}: unknown; use one of {', '.join(PYPI_WEIGHTS)}")


@dataclass
class TrainingSet:
    images: np.ndarray  # (n, s, s, 3) uint8, squashed to the training size
    masks: np.ndarray  # (n, s, s) uint8 in {0, 1}


def training_rows(dataset: Dataset, ambiguous: Dataset | None, split: pd.Series) -> list[Path]:
    """Training paths: the split's train rows, plus ambiguous-identity rows from encounters not held out."""
    paths = [Path(p) for p in dataset.table.loc[split == "train", "path"]]
    if ambiguous is not None and "encounter" in dataset.table.columns:
        held_out = set(dataset.table.loc[split == "val", "encounter"])
        extra = ambiguous.table[~ambiguous.table["encounter"].isin(held_out)]
        known = set(dataset.table["path"].map(same_file_key))
        paths += [Path(p) for p in extra["path"] if same_file_key(p) not in known]
    return paths


def build_training_set(paths: list[Path], labels: MaskProvider, size: int) -> TrainingSet:
    """Images with a mask (alpha or teacher); frames where the teacher finds nothing are left out, since
    every labelled frame shows an animal and an empty pseudo-mask is a teacher miss, not a lesson."""
    images, masks = [], []
    for path in paths:
        record = load_image(path)
        mask = labels.mask_for(record)
        if mask is None:
            continue
        images.append(cv2.resize(record.rgb, (size, size), interpolation=cv2.INTER_AREA))
        masks.append(cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST))
    if not images:
        raise SpotmatchError(f"none of the {len(paths)} training image(s) has a mask (alpha channel or {labels.conf.source}):"
                             " train on more images (raise --max-images, or 0 for all) or check --csv")
    return TrainingSet(np.stack(images), np.stack(masks))


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip, scale/shift, brightness/contrast and sometimes grey (infrared nights look like that)."""
    size = image.shape[0]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    scale = rng.uniform(0.75, 1.35)
    shift = rng.uniform(-0.15, 0.15, 2) * size
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-10, 10), scale)
    matrix[:, 2] += shift
    image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), borderMode=cv2.BORDER_REFLECT_101)
    mask = cv2.warpAffine(np.ascontiguousarray(mask), matrix, (size, size), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_REFLECT_101)
    pixels = image.astype(np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-25, 25)
    if rng.random() < 0.25:
        pixels = np.repeat(pixels.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(pixels, 0, 255).astype(np.uint8), mask


def batches(data: TrainingSet, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(len(data.images))
    for start in range(0, len(order), batch_size):
        pairs = [augment(data.images[i], data.masks[i], rng) for i in order[start : start + batch_size]]
        images = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs]).astype(np.float32)
        yield to_input_tensor(images), torch.from_numpy(masks)[:, None]


def make_optimizer(model: torch.nn.Module, conf: TrainSegConfig) -> torch.optim.Optimizer:
    encoder = list(model.encoder.parameters())
    encoder_ids = {id(p) for p in encoder}
    rest = [p for p in model.parameters() if id(p) not in encoder_ids]
    return torch.optim.AdamW(
        [
            {"params": encoder, "lr": conf.learning_rate * conf.encoder_learning_rate_factor},
            {"params": rest, "lr": conf.learning_rate},
        ],
        weight_decay=conf.weight_decay,
    )


def diverged(what: str, conf: TrainSegConfig) -> SpotmatchError:
    return SpotmatchError(f"training diverged ({what}); lower --lr (now {conf.learning_rate:g}); no checkpoint written")


def fit(model: torch.nn.Module, data: TrainingSet, conf: TrainSegConfig, device: torch.device) -> list[dict]:
    """Dice + BCE on the pseudo-masks, cosine-decayed AdamW; returns one log row per epoch."""
    import segmentation_models_pytorch as smp

    dice, bce = smp.losses.DiceLoss(mode="binary"), smp.losses.SoftBCEWithLogitsLoss()
    steps_per_epoch = math.ceil(len(data.images) / conf.batch_size)
    total_steps = conf.epochs * steps_per_epoch
    if conf.max_steps > 0:
        total_steps = min(total_steps, conf.max_steps)
    optimizer = make_optimizer(model, conf)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps, pct_start=0.1
    )
    rng = np.random.default_rng(conf.seed)
    history, step = [], 0
    model.to(device).train()
    for epoch in range(conf.epochs):
        started, losses = time.time(), []
        for images, masks in batches(data, conf.batch_size, rng):
            images, masks = images.to(device), masks.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(images).float()
            loss = dice(logits, masks) + bce(logits, masks)
            value = loss.item()
            if not math.isfinite(value):  # one NaN step poisons every weight: stop before it is taken
                raise diverged(f"loss {value} at step {step + 1}", conf)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(value)
            step += 1
            if step >= total_steps:
                break
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - started, 1)})
        log.info("epoch %d/%d loss %.4f (%.0f s)", epoch + 1, conf.epochs, history[-1]["loss"], history[-1]["seconds"])
        if step >= total_steps:
            break
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # the last step has no loss after it
        raise diverged(f"non-finite weights after step {step}", conf)
    return history


def train_config_dict(conf: TrainSegConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(conf), default=str))


def train_seg(
    conf: TrainSegConfig,
    csv_path: Path,
    image_dir: Path | None,
    output_dir: Path,
    cache_dir: Path | None,
    device: str = "cpu",
) -> Path:
    """Train, evaluate on the held-out split against the label masks, write `unet.pt`, `metrics.json`,
    `val_iou.csv` into `output_dir`; returns the checkpoint path."""
    torch_device = resolve_device(device)
    torch.manual_seed(conf.seed)
    dataset = load_dataset(csv_path, image_dir)
    split = split_dataset(dataset, conf.split)
    ambiguous = load_dataset(csv_path, image_dir, drop_ambiguous=False) if conf.include_ambiguous else None
    train_paths = training_rows(dataset, ambiguous, split)
    if conf.max_images > 0:
        train_paths = train_paths[: conf.max_images]
    val_paths = [Path(p) for p in dataset.table.loc[split == "val", "path"]]
    if not val_paths:  # refused before training: its IoU is the run's only measure, and the crash came after it
        raise SpotmatchError(f"{csv_path}: no held-out images when split by {conf.split.by} (every group is in training);"
                             f" use --split-by identity, or a CSV with several {conf.split.by}s per animal")
    labels = MaskProvider.from_config(conf.labels, cache_dir)
    log.info("masks for %d training images (%s)", len(train_paths), conf.labels.source)
    data = build_training_set(train_paths, labels, conf.unet.image_size)
    log.info("%d of %d training images have a mask", len(data.images), len(train_paths))

    model = build_unet(conf.unet, imagenet_encoder=conf.imagenet_encoder)
    history = fit(model, data, conf, torch_device)

    segmenter = UNetSegmenter(model, conf.unet, str(torch_device))
    predicted = MaskProvider(dataclasses.replace(conf.labels, source="unet:in-memory"), lambda: segmenter, cache=None)
    per_image = compare_masks(val_paths, predicted, labels)
    metrics = {
        "val_images": len(val_paths),
        "train_images": int(len(data.images)),
        "iou_vs_labels": summarise_iou(per_image),
        "iou_vs_labels_where_label_nonempty": summarise_iou(per_image[per_image["area_reference"] > 0]),
        "history": history,
        "config_hash": config_hash(conf),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = save_checkpoint(output_dir / CHECKPOINT_NAME, model, conf.unet, train_config_dict(conf), metrics)
    write_csv_atomic(per_image, output_dir / "val_iou.csv")
    write_text_atomic(json.dumps(metrics, indent=2), output_dir / "metrics.json")
    log.info("val IoU vs %s: %.3f (%d images)", conf.labels.source, metrics["iou_vs_labels"]["all"]["mean_iou"], len(val_paths))
    return checkpoint
