"""Engine verbs: calibrate (fit fusion and measure every stage) and identify."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from spotmatch.cli.app import app
from spotmatch.config import DEFAULT_CACHE
from spotmatch.cli.global_cmds import CHECKPOINT_HELP, DATA_HELP, IMAGES_HELP, WEIGHTS_HELP, _embed_config, cache_root


@app.command()
def calibrate(
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    checkpoint: Path = typer.Option(..., help=CHECKPOINT_HELP + " Its stored split picks the held-out queries."),
    out_dir: Optional[Path] = typer.Option(None, help="Where fusion.json, reliability.png and calibration.md go (default: beside the checkpoint)."),
    images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
    top_k: int = typer.Option(20, min=1, help="Local matching re-scores each query's K best gallery images."),
    extractor: str = typer.Option("rootsift", help="Local features: rootsift, disk, aliked, xfeat, loftr (with --weights)."),
    local_masks: Optional[str] = typer.Option(None, help="Keypoints only inside masks from: alpha, teacher, unet:CKPT, none (default: the checkpoint's mask source)."),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    method: str = typer.Option("logistic", help="logistic or isotonic."),
    target_precision: float = typer.Option(0.9, help="Precision the 'same individual' threshold must reach."),
    new_share: float = typer.Option(0.5, help="Share of photos of animals missing from the gallery that `identify` is expected to meet; sets its threshold."),
    decision: str = typer.Option("margin", help="What identify's threshold applies to: margin (the best individual's probability minus the"
                                                " next one's) or best (the best individual's probability). Both are measured."),
    balance: str = typer.Option("identity", help="identity: every query animal, and within a query every gallery animal, weighs the same in the fit (as in identity-balanced mAP); none: every pair the same."),
    monotone: bool = typer.Option(True, "--monotone/--free-signs", help="A higher cosine never lowers the probability, a worse global rank never raises it (--free-signs: every weight free)."),
    compare_rerankers: bool = typer.Option(True, help="Also measure query expansion and k-reciprocal re-ranking."),
    rerank: str = typer.Option("none", help="Fit the saved calibration on re-ranked global similarities (qe or k-reciprocal), "
                                            "for `score-pairs --rerank` with the same name; the catalogue takes only none."),
    split_by: str = typer.Option("identity", help="When the checkpoint was not trained on this table: identity or a group column."),
    keep_ambiguous: bool = typer.Option(False, help="Keep rows whose `unambiguous` column is false."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    num_workers: int = typer.Option(2, min=0, help="Image decoding processes / local matching threads."),
    cache_dir: Optional[Path] = typer.Option(Path(DEFAULT_CACHE), help="Cache folder for embeddings and local features ('' disables)."),
) -> None:
    """Fit the fusion calibrator on held-out pairs; report IB-mAP of every stage and calibration quality."""
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.engine import calibrate as calibration
    from spotmatch.engine.engine import EngineConfig
    from spotmatch.evaluation.run import split_for
    from spotmatch.global_embed.embed import Embedder
    from spotmatch.io import check_output_dir

    started = time.perf_counter()
    out_dir = check_output_dir(out_dir or checkpoint.parent, "--out-dir")
    calibration.check_outputs(out_dir, [data, checkpoint])
    dataset = load_dataset(data, images, drop_ambiguous=not keep_ambiguous)
    split, used_split_by, origin = split_for(dataset, SplitConfig(by=split_by), checkpoint)
    run = _embed_config(32, device, False, num_workers, cache_dir)
    engine_conf = EngineConfig(shortlist_k=top_k, extractor=extractor, local_workers=num_workers, masks=local_masks,
                               cache_dir=cache_root(cache_dir), local_weights=weights, local_device=device)
    conf = calibration.CalibrateConfig(method=method, target_precision=target_precision, balance=balance, new_share=new_share, monotone=monotone,
                                       decision=decision, rerank=rerank,
                                       rerankers=calibration.CalibrateConfig.rerankers if compare_rerankers else ())
    result = calibration.main(dataset, split, used_split_by, Embedder.from_checkpoint(checkpoint, run), engine_conf, conf, out_dir,
                              split_origin=origin)
    typer.echo(result["report"])
    typer.echo(f"wrote {result['fusion_path']}, {result['diagram']} and {result['report_path']} in {time.perf_counter() - started:.0f}s")
