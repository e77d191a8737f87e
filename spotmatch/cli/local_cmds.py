"""`spotmatch match` (re-score a pairs CSV with local evidence) and `spotmatch explain` (draw one pair)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd
import typer

from spotmatch.cli.app import app, say_done
from spotmatch.config import DEFAULT_CACHE
from spotmatch.cli.global_cmds import BACKEND_HELP, IMAGES_HELP, RAY_ADDRESS_HELP, RAY_CONFIG_HELP, WEIGHTS_HELP, cache_root, check_backend
from spotmatch.errors import SpotmatchError



CACHE_HELP = "Cache folder (features go to <cache>/local/...); '' caches nothing."
LOCAL_MASKS_HELP = ("Keypoints only inside masks from: alpha, teacher, unet:CKPT, none (default: the --checkpoint's mask"
                    " source, as calibrate and score-pairs use; without one, alpha).")
DEVICE_HELP = "Where the local stage's networks (learned extractors, LightGlue, a U-Net's masks) run: auto, cpu, cuda ... (RootSIFT runs on the CPU)."


def _checkpoint_embedder(checkpoint: Path, cache_dir: str | None, device: str):
    """The global-embedding stage (imported only when asked for), caching under the command's --cache-dir."""
    from spotmatch.global_embed.embed import EmbedConfig, Embedder

    return Embedder.from_checkpoint(checkpoint, EmbedConfig(cache_dir=cache_dir, device=device))


def local_stage_conf(extractor: str, local_masks: Optional[str], cache_dir: str | None, weights: Optional[str], device: str,
                     workers: int = 2):
    """The local stage as `calibrate` and `score-pairs` build it (EngineConfig), so a pair gets the same evidence
    from every command; each pair's evidence is not stored (matching is what these commands are for)."""
    from spotmatch.engine.engine import EngineConfig

    return EngineConfig(extractor=extractor, masks=local_masks, local_workers=workers, cache_dir=cache_dir, cache_pairs=False,
                        local_weights=weights, local_device=device)


def select_pairs(pairs: pd.DataFrame, top_k: int, embedder) -> tuple[pd.DataFrame, pd.Series]:
    """Global columns to carry into the output, and which rows to match (each query's top-K, or all).
    `embedder`: anything with `embed(paths)` (the checkpoint's own, or the Ray backend's)."""
    from spotmatch.engine.scoring import global_pair_scores

    if top_k <= 0:
        return pd.DataFrame(index=pairs.index), pd.Series(True, index=pairs.index)
    if embedder is None:
        raise SpotmatchError("--top-k needs a global model to rank pairs: pass --checkpoint CKPT, or --top-k 0 for all pairs")
    scores = global_pair_scores(pairs, embedder)
    return scores[["cosine", "global_rank"]], scores["global_rank"] < top_k


@app.command("match")
def match(
    pairs_csv: Path = typer.Argument(..., help="pairs CSV with row_id, query_image, gallery_image"),
    images: Optional[Path] = typer.Option(None, "--images", help=IMAGES_HELP),
    out: Path = typer.Option(..., "--out", help="evidence CSV to write"),
    extractor: str = typer.Option("rootsift", "--extractor", help="rootsift, disk, aliked, xfeat or loftr"),
    top_k: int = typer.Option(20, "--top-k", min=0, help="match only each query's K best pairs by global cosine; 0 = all"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="global model checkpoint, for --top-k"),
    local_masks: Optional[str] = typer.Option(None, "--local-masks", help=LOCAL_MASKS_HELP),
    cache: Path = typer.Option(Path(DEFAULT_CACHE), "--cache-dir", "--cache", help=CACHE_HELP),
    workers: int = typer.Option(2, "--workers", min=1, help="CPU threads for SIFT extraction and matching"),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    backend: str = typer.Option("local", "--backend", help=BACKEND_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_config: Optional[Path] = typer.Option(None, "--ray-config", help=RAY_CONFIG_HELP),
) -> None:
    """Re-score image pairs with local keypoint evidence: matches, inliers, inlier_ratio, local_score."""
    from spotmatch.data.tables import load_pairs
    from spotmatch.engine.engine import build_local
    from spotmatch.io import check_output, write_csv_atomic

    check_backend(backend)
    pairs = load_pairs(pairs_csv, images)
    check_output(out, [pairs_csv, *([checkpoint] if checkpoint else []),
                       *dict.fromkeys([*pairs["query_image_path"], *pairs["gallery_image_path"]])])
    cache_dir = cache_root(cache)
    conf = local_stage_conf(extractor, local_masks, cache_dir, weights, device, workers)
    if backend == "ray":
        from spotmatch.engine import ray_backend as rb

        ray_conf, job_dir = rb.load_ray_config(ray_config, address=ray_address), rb.default_job_dir(out)
        with rb.ray_session(ray_conf):
            embedder = rb.RayEmbedder(str(checkpoint), None, ray_conf, job_dir) if checkpoint and top_k > 0 else None
            global_columns, selected = select_pairs(pairs, top_k, embedder)
            todo = pairs[selected]
            evidence = rb.match_on_ray(todo, conf, _checkpoint_masks(checkpoint), ray_conf, job_dir).drop(columns="row_id").set_index(todo.index)
    else:
        embedder = _checkpoint_embedder(checkpoint, cache_dir, device) if checkpoint and top_k > 0 else None
        global_columns, selected = select_pairs(pairs, top_k, embedder)
        scorer = build_local(conf, _checkpoint_masks(checkpoint))
        todo = pairs[selected]
        evidence = scorer.score_pairs_shown(todo)
    table = pd.concat([pairs[["row_id"]], global_columns], axis=1).join(evidence)
    table = table.astype({"matches": "Int64", "inliers": "Int64"})  # pairs left unmatched stay empty
    write_csv_atomic(table, out, follow=True)
    say_done(f"wrote {out} ({int(selected.sum())} of {len(pairs)} pairs matched)", out)


def _checkpoint_masks(checkpoint: Optional[Path]) -> str:
    """The mask source a checkpoint's embedder sees through (alpha without one): the local stage's default."""
    if checkpoint is None:
        return "alpha"
    from spotmatch.global_embed.checkpoint import read_checkpoint
    from spotmatch.global_embed.model import EmbedderConfig

    return read_checkpoint(checkpoint)["embedder_config"].get("masks", EmbedderConfig.masks)


@app.command("explain")
def explain(
    query: Path = typer.Argument(..., help="query image"),
    gallery: Path = typer.Argument(..., help="gallery image"),
    out: Path = typer.Option(Path("match.png"), "--out", help="PNG to write; the keypoints go to the same name .json"),
    extractor: str = typer.Option("rootsift", "--extractor", help="rootsift, disk, aliked, xfeat or loftr"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="global model checkpoint: adds the cosine"),
    fusion: Optional[Path] = typer.Option(None, "--fusion", help="calibration file (with --checkpoint): adds the fused probability"),
    local_masks: Optional[str] = typer.Option(None, "--local-masks", help=LOCAL_MASKS_HELP + " With --fusion: its own."),
    cache: Path = typer.Option(Path(DEFAULT_CACHE), "--cache-dir", "--cache", help=CACHE_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    global_rank: int = typer.Option(0, "--global-rank", min=0, help="with --fusion: the gallery photo's place in the query's global list "
                                                              "(0: its best; the global_rank column of score-pairs --evidence-out), "
                                                              "on which the fused probability depends"),
) -> None:
    """Draw the verified keypoint matches of one pair, with the scores, and save the keypoints as JSON.

    Lowe's ratio test is taken from the query's side, so swapping the two photos can change the inliers
    (docs/local_match.md); give them in the order score-pairs or identify met them."""
    from spotmatch.engine.engine import build_local
    from spotmatch.engine.scoring import one_pair_scores
    from spotmatch.io import check_output
    from spotmatch.local_match.explain import explain_pair

    if out.suffix.lower() != ".png":
        raise SpotmatchError(f"{out}: explain draws a PNG (and writes its keypoints beside it as .json); end --out in .png")
    read = [query, gallery, *([checkpoint] if checkpoint else []), *([fusion] if fusion else [])]
    for drawing in (out, out.with_suffix(".json")):  # what explain_pair writes
        check_output(drawing, read)
    if global_rank and fusion is None:
        # Only the fused probability depends on the rank; silently ignoring it would suggest it was used.
        raise SpotmatchError("--global-rank sets the place the fused probability is computed at: pass --fusion (and --checkpoint) too")
    cache_dir = cache_root(cache)
    conf = local_stage_conf(extractor, local_masks, cache_dir, weights, device)
    if fusion is not None:
        if checkpoint is None:
            raise SpotmatchError("--fusion needs the global model it was calibrated for: pass --checkpoint too")
        from spotmatch.engine.engine import Engine
        from spotmatch.engine.engine import explain as explain_with_engine
        from spotmatch.global_embed.embed import EmbedConfig

        engine = Engine.from_files(checkpoint, fusion, conf, EmbedConfig(cache_dir=cache_dir, device=device))
        result = explain_with_engine(engine, query, gallery, out, global_rank)
        typer.echo(f"wrote {result.png_path} and {result.json_path}: {result.scores.text()}")
        return

    embedder = _checkpoint_embedder(checkpoint, cache_dir, device) if checkpoint is not None else None
    scorer = build_local(conf, _checkpoint_masks(checkpoint))
    cosine = float(one_pair_scores(embedder, query, gallery)["cosine"].iloc[0]) if embedder is not None else None
    result = explain_pair(query, gallery, scorer, out, cosine=cosine, probability=None, settings=scorer.conf_name)
    typer.echo(f"wrote {result.png_path} and {result.json_path}: {result.scores.text()}")


