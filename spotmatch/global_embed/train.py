"""ArcFace training of the global embedder: `main(...)` writes `last.pt` and `best.pt` into a run folder."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spotmatch.config import DEFAULT_CACHE, config_to_dict
from spotmatch.data.splits import SplitConfig, split_dataset
from spotmatch.data.tables import Dataset, same_file_key
from spotmatch.device import resolve_device
from spotmatch.errors import SpotmatchError
from spotmatch.evaluation.protocol import build_protocol, embed_protocol, evaluate_protocol, refuse_trivial_protocol
from spotmatch.global_embed.checkpoint import read_checkpoint, save_checkpoint
from spotmatch.global_embed.embed import EmbedConfig, Embedder, NonFiniteEmbeddings, mask_provider
from spotmatch.global_embed.loading import ImageTensorDataset, checked_batches, make_loader
from spotmatch.global_embed.model import MEMORY_FORMAT, ArcFace, EmbedderConfig, ReIDNet
from spotmatch.global_embed.sampler import PKBatchSampler
from spotmatch.global_embed.transforms import AugmentConfig, build_train_augment, normalise
from spotmatch.io import check_output_dir, write_csv_atomic


@dataclass
class TrainConfig:
    epochs: int = 30
    identities_per_batch: int = 8  # P
    images_per_identity: int = 4  # K
    lr: float = 3e-4
    head_lr_multiplier: float = 10.0  # the freshly initialised neck and ArcFace head learn faster
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    arcface_scale: float = 30.0
    arcface_margin: float = 0.5
    amp: bool = True  # bfloat16 autocast on GPU; ignored on CPU
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    eval_every: int = 1  # epochs between validation mAP measurements (0: only at the end)
    # The protocol view whose validation IB-mAP picks best.pt: "all", or an honest view the data allow
    # ("same flank", "other photo_id", "cross-station"), where "all" rewards what the coat cannot show.
    select_view: str = "all"
    # Each flank of an animal its own ArcFace class (needs a `side` column): the two flanks carry different
    # patterns, and one class for both asks the network to tie them by something else.
    flank_classes: bool = False
    # Share of each batch's identities drawn from the `--extra-train` sets; None draws every identity alike, and
    # then a small main set (11 snow leopards beside 179 nyala) is seen in few batches.
    extra_share: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# Settings a resumed run may change: more epochs, another machine.
RESUMABLE_CHANGES = ("epochs", "device", "num_workers", "eval_every")


def changed_settings(saved: dict, conf: TrainConfig) -> list[str]:
    """The training settings of `conf` that differ from a checkpoint's, apart from RESUMABLE_CHANGES; settings the
    checkpoint predates count as their defaults."""
    saved = {**config_to_dict(TrainConfig()), **saved}
    current = config_to_dict(conf)
    return sorted(name for name, value in current.items() if name not in RESUMABLE_CHANGES and saved[name] != value)


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def refuse_unusable_settings(embedder_conf: EmbedderConfig, train_conf: TrainConfig) -> None:
    """Settings that cannot train (or would train into NaN weights and report success), named by their
    `spotmatch train` option, before any file is written."""
    checks = [("--epochs", train_conf.epochs, train_conf.epochs >= 1, "at least 1"),
              ("--batch-identities", train_conf.identities_per_batch, train_conf.identities_per_batch >= 1, "at least 1"),
              ("--images-per-identity", train_conf.images_per_identity, train_conf.images_per_identity >= 1, "at least 1"),
              ("--lr", train_conf.lr, math.isfinite(train_conf.lr) and train_conf.lr > 0, "a number above 0"),
              ("--num-workers", train_conf.num_workers, train_conf.num_workers >= 0, "0 or more"),
              ("--eval-every", train_conf.eval_every, train_conf.eval_every >= 0, "0 (only at the end) or more"),
              ("--random-background", train_conf.augment.random_background, 0 <= train_conf.augment.random_background <= 1,
               "a probability from 0 to 1"),
              ("--image-size", embedder_conf.image_size, embedder_conf.image_size >= 32, "at least 32 pixels"),
              ("--embedding-dim", embedder_conf.embedding_dim, embedder_conf.embedding_dim >= 2, "at least 2")]
    for option, value, usable, wanted in checks:
        if not usable:
            raise SpotmatchError(f"{option} {value}: must be {wanted}")


def refuse_unusable_data(dataset: Dataset, extra_datasets: Sequence[Dataset], train_conf: TrainConfig,
                         split_conf: SplitConfig) -> None:
    """Settings that this data cannot serve, named by their option, before any file is written."""
    if split_conf.holds_out_everything:
        raise SpotmatchError("--val-fraction 1: holds every photo out and leaves nothing to train on; hold out a share below 1"
                             " (evaluate takes 1)")
    if train_conf.flank_classes and "side" not in dataset.table.columns:
        raise SpotmatchError(f"{dataset.csv_path}: --flank-classes needs a side column (left/right); add it or drop the flag")
    if train_conf.extra_share is not None and not (extra_datasets and 0 < train_conf.extra_share < 1):
        raise SpotmatchError(f"--extra-share {train_conf.extra_share}: needs --extra-train and a share between 0 and 1 (exclusive)")


def refuse_unusable_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """A run folder's checkpoints are never replaced unasked: a calibration beside them is only valid for them."""
    check_output_dir(out_dir, "--out")
    if resume and overwrite:
        raise SpotmatchError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if resume and not (out_dir / "last.pt").is_file():
        raise SpotmatchError(f"{out_dir / 'last.pt'}: no run to resume here; drop --resume to start one")
    held = [name for name in ("best.pt", "last.pt") if (out_dir / name).exists()]
    if held and not resume and not overwrite:
        raise SpotmatchError(f"{out_dir}: already holds a training run ({', '.join(held)}); pass --resume to continue it,"
                             f" --overwrite to replace it, or another --out")


# With the checkpoints go the calibration outputs made for them: a report beside a new model would describe the old.
REPLACED_RUN_FILES = ("best.pt", "last.pt", "history.csv", "fusion.json", "calibration.md", "reliability.png")


def clear_replaced_run(out_dir: Path) -> None:
    """`--overwrite`: the earlier run's files go before the new run writes any, so that no file of it (a
    best.pt no epoch of the new run beat, say) passes for the new run's."""
    for name in REPLACED_RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)


def diverged(out_dir: Path, epoch: int, symptom: str, lr: float, best_path: Path) -> SpotmatchError:
    kept = f"; {best_path} holds the best epoch before it" if best_path.exists() else ""
    return SpotmatchError(f"{out_dir}: training diverged in epoch {epoch + 1} ({symptom}); lower --lr (now {lr:g}){kept}")


def training_classes(table: pd.DataFrame, flank_classes: bool) -> pd.Series:
    """The ArcFace class of each row: its identity, or with `flank_classes` its identity and flank where the
    flank is known."""
    identity = table["identity"].astype(str)
    if not flank_classes:
        return identity
    side = table["side"]  # left, right or missing: load_dataset refused any other word
    return identity.where(side.isna(), identity + "/" + side)


def extra_training_tables(main: Dataset, extra_datasets: Sequence[Dataset]) -> list[pd.DataFrame]:
    """Every row of each extra labelled set, its identities prefixed with the set's folder name, so that an extra
    animal never shares a class with one of the main set."""
    main_files = set(main.table["path"].map(same_file_key))
    tables, names = [], set()
    for number, extra in enumerate(extra_datasets, start=1):
        shared = main_files.intersection(extra.table["path"].map(same_file_key))
        if shared:
            raise SpotmatchError(f"{extra.csv_path}: shares {len(shared)} images with {main.csv_path} (e.g. {min(shared)}); "
                                 f"--extra-train takes another set, never the one validated on")
        name = extra.csv_path.parent.name if extra.csv_path else "extra"
        name = name if name not in names else f"{name}{number}"
        names.add(name)
        tables.append(extra.table.assign(identity=name + ":" + extra.table["identity"].astype(str)))
    return tables


def sampling_weights(classes: pd.Series, class_names: list[str], from_extra: np.ndarray, extra_share: float | None) -> dict[int, float] | None:
    """Per class index, its weight in the PK sampler's draw: the main set's classes share `1 - extra_share`
    equally, the extra sets' share `extra_share`."""
    if extra_share is None or not from_extra.any():
        return None
    extra_classes = set(classes[from_extra])
    n_extra = len(extra_classes)
    n_main = len(class_names) - n_extra
    return {index: extra_share / n_extra if name in extra_classes else (1 - extra_share) / n_main
            for index, name in enumerate(class_names)}


def validation_ib_map(model: ReIDNet, conf: EmbedderConfig, dataset: Dataset, split: pd.Series, split_by: str,
                      run: EmbedConfig, view: str) -> float:
    protocol = build_protocol(dataset.table, split, split_by)
    if len(protocol.query_rows) == 0:
        return float("nan")
    embedder = Embedder(model, conf, identity="in-training", run=dataclasses.replace(run, cache_embeddings=False, progress=False))
    query_embeddings, gallery_embeddings = embed_protocol(embedder.embed, dataset.paths, protocol)
    similarity = query_embeddings @ gallery_embeddings.T
    identities = dataset.table["identity"].to_numpy()
    result = evaluate_protocol(similarity, identities, protocol)[view]["ib_map"]
    model.train()
    return result


def run_record(dataset: Dataset, split: pd.Series, extra_datasets: Sequence[Dataset], train_conf: TrainConfig,
               split_conf: SplitConfig, class_names: list[str]) -> dict:
    """What every checkpoint of a run holds besides weights: its settings and classes (checked by `--resume`)
    and each photo's split and label (so that evaluate, calibrate and report reuse the split only for the
    same table)."""
    return dict(train_config=config_to_dict(train_conf), split_config=config_to_dict(split_conf),
                class_names=class_names, dataset=str(dataset.csv_path),
                split_assignment=dict(zip(dataset.table["filename"], split)),
                identity_of=dict(zip(dataset.table["filename"], dataset.table["identity"])),
                extra_training=[{"dataset": str(extra.csv_path), "filenames": extra.table["filename"].tolist()}
                                for extra in extra_datasets])


def epoch_line(record: dict) -> str:
    """One epoch's history row as strict JSON: an epoch without validation says null (JSON has no NaN), so that
    a log reader's parser accepts the line."""
    return json.dumps({key: None if isinstance(value, float) and math.isnan(value) else value for key, value in record.items()})


class NonFiniteLoss(Exception):
    """A training step's loss is NaN or infinite: stepping on would put NaN into the weights."""


def optimisation(model: ReIDNet, head: ArcFace, train_conf: TrainConfig, steps_per_epoch: int):
    """AdamW (the head and neck at a multiple of the backbone's learning rate) and its warm-up + cosine schedule."""
    optimiser = torch.optim.AdamW(
        [{"params": model.backbone.parameters(), "lr": train_conf.lr},
         {"params": [*model.pool.parameters(), *model.neck.parameters(), *head.parameters()],
          "lr": train_conf.lr * train_conf.head_lr_multiplier}],
        weight_decay=train_conf.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, warmup_cosine(train_conf.epochs * steps_per_epoch, int(train_conf.warmup_epochs * steps_per_epoch)))
    return optimiser, scheduler


def restore_run(last_path: Path, embedder_conf: EmbedderConfig, train_conf: TrainConfig, class_names: list[str],
                split_assignment: dict[str, str], modules: dict) -> tuple[int, list[dict], float]:
    """`--resume`: load the model, head, optimiser and scheduler states (`modules`, by checkpoint key) of the
    run in `last_path`, refused unless it was trained with the same settings, classes and split (another
    --split-by or --seed would move photos it trained on into validation). Returns the epochs done, the
    history and the best validation IB-mAP so far."""
    state = read_checkpoint(last_path)
    if state["embedder_config"] != config_to_dict(embedder_conf) or state["class_names"] != class_names:
        raise SpotmatchError(f"{last_path}: was trained with another model config or data; resume with the same settings or use a new --out")
    stored = state.get("split_assignment")
    if stored is not None and stored != split_assignment:
        moved = sum(stored.get(name) != part for name, part in split_assignment.items())
        raise SpotmatchError(f"{last_path}: was split otherwise ({moved} photo(s) on another side now); resume with the run's"
                             f" data, --split-by and --seed, or use a new --out")
    changed = changed_settings(state["train_config"], train_conf)
    if changed:
        raise SpotmatchError(f"{last_path}: was trained with other settings ({', '.join(changed)}); resume with the same settings or use a new --out")
    for key, module in modules.items():
        module.load_state_dict(state[key])
    return state["epoch"], state["history"], state["best_ib_map"]


def train_epoch(model: ReIDNet, head: ArcFace, loader, optimiser, scheduler, device: torch.device, use_amp: bool,
                steps: int, description: str) -> float:
    """One pass over the loader; returns the mean loss. Raises NonFiniteLoss before a NaN step is taken."""
    losses = []
    for batch in tqdm(checked_batches(loader), total=steps, desc=description, leave=False, disable=None):
        inputs, targets = normalise(batch.images.to(device, non_blocking=True)), batch.labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            features = model(inputs)
        loss = torch.nn.functional.cross_entropy(head(features.float(), targets), targets)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):  # stop before NaN weights are stepped into, saved and validated as "best"
            raise NonFiniteLoss(f"loss {losses[-1]}")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
    return float(np.mean(losses))


@dataclass
class TrainingSet:
    """The rows trained on (the split's training rows, then every extra data set's), each row's class and
    its index into `class_names`; `from_extra` marks the extra data sets' rows."""
    table: pd.DataFrame
    classes: pd.Series
    class_names: list[str]
    labels: list[int]
    from_extra: np.ndarray


def validation_split(dataset: Dataset, split_conf: SplitConfig, select_view: str) -> pd.Series:
    """"train" or "val" per row; refused when validation could not rank anything or lacks `select_view`."""
    split = split_dataset(dataset, split_conf) if split_conf.val_fraction > 0 else pd.Series("train", index=dataset.table.index)
    protocol = build_protocol(dataset.table, split, split_conf.by)
    refuse_trivial_protocol(protocol, dataset.table["identity"].to_numpy(), dataset.csv_path)
    if select_view not in protocol.views:
        raise SpotmatchError(f"--select-view {select_view}: not a view of {dataset.csv_path}; use one of {', '.join(protocol.views)}")
    return split


def training_set(dataset: Dataset, split: pd.Series, extra_datasets: Sequence[Dataset], flank_classes: bool) -> TrainingSet:
    train_rows = split == "train"
    table = pd.concat([dataset.table[train_rows], *extra_training_tables(dataset, extra_datasets)], ignore_index=True)
    classes = training_classes(table, flank_classes)
    class_names = sorted(classes.unique())
    if len(class_names) < 2:
        raise SpotmatchError(f"{dataset.csv_path}: training needs at least 2 identities, found {len(class_names)}")
    label_of = {name: i for i, name in enumerate(class_names)}
    return TrainingSet(table, classes, class_names, [label_of[name] for name in classes],
                       from_extra=np.arange(len(table)) >= int(train_rows.sum()))


def main(dataset: Dataset, embedder_conf: EmbedderConfig, train_conf: TrainConfig, split_conf: SplitConfig,
         out_dir: str | Path, resume: bool = False, extra_datasets: Sequence[Dataset] = (), overwrite: bool = False,
         cache_dir: str | Path | None = DEFAULT_CACHE) -> Path:
    """Train on the split's training rows (and every row of `extra_datasets`), validate on the split's validation
    rows; returns best.pt. An earlier run in `out_dir` is continued with `resume`, replaced with `overwrite`,
    and otherwise refused. `cache_dir` keeps the masks (never embeddings: the model is still changing)."""
    out_dir = Path(out_dir)
    refuse_unusable_settings(embedder_conf, train_conf)
    refuse_unusable_data(dataset, extra_datasets, train_conf, split_conf)
    refuse_unusable_run_folder(out_dir, resume, overwrite)
    torch.manual_seed(train_conf.seed)
    device = resolve_device(train_conf.device)

    split = validation_split(dataset, split_conf, train_conf.select_view)
    training = training_set(dataset, split, extra_datasets, train_conf.flank_classes)
    class_names = training.class_names

    model = ReIDNet(embedder_conf).to(device, memory_format=MEMORY_FORMAT)
    head = ArcFace(embedder_conf.embedding_dim, len(class_names), train_conf.arcface_scale, train_conf.arcface_margin).to(device)
    sampler = PKBatchSampler(training.labels, train_conf.identities_per_batch, train_conf.images_per_identity, train_conf.seed,
                             sampling_weights(training.classes, class_names, training.from_extra, train_conf.extra_share))
    optimiser, scheduler = optimisation(model, head, train_conf, len(sampler))
    train_paths = [Path(p) for p in training.table["path"]]
    masks = mask_provider(embedder_conf.masks, cache_dir, device)
    if masks is not None:
        masks.fill_cache(train_paths)
    images = ImageTensorDataset(train_paths, embedder_conf, training.labels, augment=build_train_augment(train_conf.augment),
                                mask_fn=masks.mask_for if masks else None,
                                random_background=train_conf.augment.random_background)

    history: list[dict] = []
    start_epoch, best_map = 0, -1.0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    checkpoint_extra = run_record(dataset, split, extra_datasets, train_conf, split_conf, class_names)
    if resume:
        start_epoch, history, best_map = restore_run(last_path, embedder_conf, train_conf, class_names, checkpoint_extra["split_assignment"],
                                                     {"model": model, "head": head, "optimiser": optimiser, "scheduler": scheduler})
        if start_epoch >= train_conf.epochs:
            raise SpotmatchError(f"{last_path}: already trained {start_epoch} epochs; pass --epochs above {start_epoch} to go on")
    # The folder is touched only now, once the model, masks and any run to resume are known to be usable: an
    # --overwrite refused for a bad setting keeps the run it would have replaced.
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        clear_replaced_run(out_dir)
    write_csv_atomic(dataset.table[["filename", "identity"]].assign(split=split), out_dir / "split.csv")

    run = EmbedConfig(batch_size=64, num_workers=train_conf.num_workers, device=str(device), cache_dir=cache_dir)
    use_amp = train_conf.amp and device.type == "cuda"
    loader = make_loader(images, 0, train_conf.num_workers, batch_sampler=sampler, pin_memory=device.type == "cuda",
                         persistent=True)
    model.train()
    for epoch in range(start_epoch, train_conf.epochs):
        sampler.set_epoch(epoch)  # read by the loader's next pass: the sampler runs in this process
        started = time.perf_counter()
        try:
            mean_loss = train_epoch(model, head, loader, optimiser, scheduler, device, use_amp, len(sampler),
                                    f"epoch {epoch + 1}/{train_conf.epochs}")
        except NonFiniteLoss as symptom:
            raise diverged(out_dir, epoch, str(symptom), train_conf.lr, best_path) from None
        epoch_seconds = time.perf_counter() - started
        is_last = epoch + 1 == train_conf.epochs
        evaluate_now = is_last or (train_conf.eval_every > 0 and (epoch + 1) % train_conf.eval_every == 0)
        try:
            val_map = (validation_ib_map(model, embedder_conf, dataset, split, split_conf.by, run, train_conf.select_view)
                       if evaluate_now else float("nan"))
        except NonFiniteEmbeddings:
            raise diverged(out_dir, epoch, "embeddings not finite", train_conf.lr, best_path) from None
        history.append({"epoch": epoch + 1, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                        "val_ib_map": val_map, "epoch_seconds": epoch_seconds})
        print(epoch_line(history[-1]), flush=True)
        improved = not math.isnan(val_map) and val_map > best_map
        if improved:
            best_map = val_map
        payload = dict(checkpoint_extra, epoch=epoch + 1, history=history, best_ib_map=best_map)
        if improved or (is_last and not best_path.exists()):
            save_checkpoint(best_path, model, embedder_conf, **payload)
        save_checkpoint(last_path, model, embedder_conf, head=head.state_dict(), optimiser=optimiser.state_dict(),
                        scheduler=scheduler.state_dict(), **payload)
        write_csv_atomic(pd.DataFrame(history), out_dir / "history.csv")
    return best_path
