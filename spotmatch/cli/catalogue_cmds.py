"""Catalogue verbs (`spotmatch catalogue ...`) and the review web app (`spotmatch serve`)."""
from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import List, Optional

import typer

from spotmatch.cli.app import app, say_done
from spotmatch.cli.global_cmds import RAY_ADDRESS_HELP, RAY_CONFIG_HELP, check_backend

catalogue_app = typer.Typer(help="A catalogue of known individuals: add photos, identify new ones, review.", no_args_is_help=True)
app.add_typer(catalogue_app, name="catalogue")

FOLDER_HELP = "The catalogue folder (catalogue.db, index.faiss, cache/)."
WHO_HELP = "Who makes this decision (recorded with the time)."


def _open(folder: Path):
    from spotmatch.catalogue.store import Catalogue

    return Catalogue.open(folder)


def _check_out(out: Path, folder: Path, read: list[Path]) -> None:
    """An --out that names the catalogue's own database or index (or a photo being read) is refused."""
    from spotmatch.catalogue.store import DB_NAME, INDEX_NAME
    from spotmatch.io import check_output

    own = [folder / name for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", INDEX_NAME)]
    check_output(out, [*own, *read], others=own)


@catalogue_app.command("init")
def init(
    folder: Path = typer.Argument(..., help=FOLDER_HELP),
    checkpoint: Path = typer.Option(..., help="The embedder checkpoint (best.pt) every image is embedded with."),
    fusion: Optional[Path] = typer.Option(None, help="Calibration file (fusion.json from `spotmatch calibrate`): turns scores into"
                                                     " probabilities and switches keypoint re-scoring on."),
    extractor: str = typer.Option("rootsift", help="Local features the fusion file was calibrated with."),
) -> None:
    """Make an empty catalogue bound to one checkpoint (and calibration file)."""
    from spotmatch.catalogue.service import init_catalogue

    catalogue = init_catalogue(folder, checkpoint, fusion, extractor)
    settings = catalogue.settings()
    typer.echo(f"catalogue {folder}: embedder {settings.embedder_id} ({settings.embedding_dim} dims),"
               f" {'calibrated with ' + settings.fusion if settings.fusion else 'no calibration file: cosine only'}")


@catalogue_app.command("add")
def add(
    folder: Path = typer.Argument(..., help=FOLDER_HELP),
    source: Path = typer.Argument(..., help="A folder of photos, one photo, or a CSV `filename[, identity, station, camera, date,"
                                              " time, side]` (side: left or right, the flank shown; empty when not known)."),
    images: Optional[Path] = typer.Option(None, help="Image folder of a CSV (default: images/ beside it, else its folder)."),
    batch_size: int = typer.Option(16, min=1, help="Images per transaction."),
    local_features: bool = typer.Option(True, "--local-features/--no-local-features", help="Extract keypoints now (faster identify later)."),
    who: str = typer.Option("cli", envvar="USER", help=WHO_HELP),
    backend: str = typer.Option("local", help="local (this process, one transaction per --batch-size images) or ray (embeddings and"
                                              " keypoints on a Ray actor pool into shards in FOLDER/ray-job, then one transaction)."),
    ray_address: Optional[str] = typer.Option(None, help=RAY_ADDRESS_HELP),
    ray_config: Optional[Path] = typer.Option(None, help=RAY_CONFIG_HELP),
) -> None:
    """Add photos; ones already in the catalogue (same file content) are skipped, corrupt ones reported."""
    from spotmatch.catalogue.service import AddConfig, add_images, open_engine, print_failures, sources_from_path

    check_backend(backend)
    add_conf = AddConfig(batch_size, who, local_features)
    catalogue = _open(folder)
    sources = sources_from_path(source, images)
    if backend == "ray":
        from spotmatch.engine import ray_backend as rb

        ray_conf = rb.load_ray_config(ray_config, address=ray_address, batch_size=batch_size)
        with rb.ray_session(ray_conf):
            report = rb.add_images_on_ray(catalogue, sources, add_conf, ray_conf)
    else:
        engine = open_engine(catalogue)
        report = add_images(catalogue, engine.embedder, engine.local, sources, add_conf)
    print_failures(report)
    typer.echo(f"added {report.added}, already there {report.already_there}, skipped {len(report.failed)}")
    if report.failed:  # the rest is added; a script must still learn that some photos are not
        raise typer.Exit(1)


@catalogue_app.command("identify")
def identify(
    folder: Path = typer.Argument(..., help=FOLDER_HELP),
    photos: List[Path] = typer.Argument(..., help="Photos to identify, or one CSV of a round: `filename[, side, ...]`, each"
                                                  " photo's side (left/right) restricting its gallery to that flank."),
    images: Optional[Path] = typer.Option(None, help="Image folder of a round's CSV (default: images/ beside it, else its folder)."),
    out: Optional[Path] = typer.Option(None, help="Also write every photo's candidates and evidence to this CSV (atomically)."),
    top_k: int = typer.Option(5, min=1, help="Individuals listed per photo."),
    shortlist_k: Optional[int] = typer.Option(None, help="Catalogue images re-scored with keypoints per photo (default: as many as the calibration file was fit with)."),
    per_individual: Optional[int] = typer.Option(None, min=1, help="At most this many images of one individual among them (default: no"
                                                            " limit; docs/catalogue.md measures both)."),
    explain_dir: Optional[Path] = typer.Option(None, help="Draw each candidate's keypoint matches into this folder."),
    station: List[str] = typer.Option([], help="Match only against catalogue photos from this station (repeat for several)."),
    since: Optional[str] = typer.Option(None, help="Only catalogue photos captured on or after this date (YYYY-MM-DD);"
                                                   " photos without a readable date are left out."),
    until: Optional[str] = typer.Option(None, help="Only catalogue photos captured on or before this date (YYYY-MM-DD)."),
    side: Optional[str] = typer.Option(None, help="The flank the photos show (left or right): catalogue photos of the other"
                                                  " flank are left out, ones of unknown flank kept."),
    individual: List[str] = typer.Option([], help="Only these individuals (repeat for several)."),
    include_retired: bool = typer.Option(False, "--include-retired", help="Also individuals retired with `catalogue retire`."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Top-K individuals per photo with calibrated probability and evidence: a match at the threshold, 'new individual'
    below the calibration's new-individual threshold, 'not sure' between."""
    from dataclasses import asdict

    from spotmatch.catalogue.service import (IdentifyConfig, identify as run_identify, kept_image_ids, open_engine, restrictions_by_side,
                                             results_table, sources_from_csv)
    from spotmatch.errors import one_line
    from spotmatch.catalogue.store import GalleryRestriction
    from spotmatch.data.images import file_sha256
    from spotmatch.io import check_output_dir, write_csv_atomic

    restriction = GalleryRestriction.from_text(station, since, until, side, individual, include_retired)
    sides, read = None, list(photos)
    if len(photos) == 1 and photos[0].suffix.lower() == ".csv":
        round_sources = sources_from_csv(photos[0], images)
        photos, sides = [s.path for s in round_sources], [s.side for s in round_sources]
    catalogue = _open(folder)
    if out is not None:
        _check_out(out, folder, [*read, *photos])
    if explain_dir is not None:
        check_output_dir(explain_dir, "--explain-dir")
    catalogue.search_index()  # an empty catalogue or restriction, and a missing photo, are reported before the model loads
    kept_image_ids(catalogue, restrictions_by_side(restriction, sides or [None]))
    for photo in photos:
        file_sha256(photo)
    results = run_identify(catalogue, open_engine(catalogue, shortlist_k), photos, IdentifyConfig(top_k, explain_dir, restriction, per_individual),
                           sides)
    if out is not None:
        write_csv_atomic(results_table(results), out, follow=True)
    if json_out:
        typer.echo(json.dumps([{**asdict(r), "verdict": r.verdict, "named": r.named, "new_threshold": r.new_below} for r in results],
                              indent=1))
        return
    for result in results:
        typer.echo("\n".join(one_line(line) for line in result_lines(result, drawn=explain_dir is not None)))


def result_lines(result, drawn: bool) -> list[str]:
    """One photo's verdict, then a line per candidate, as `identify` prints them; `drawn`: drawings were asked for."""
    # Without a calibration file the number is a similarity, not a probability: it must not read as one.
    label, threshold = ("P(same)=", "threshold") if result.calibrated else ("similarity ", "uncalibrated threshold")
    decision = result.decision if result.calibrated else "similarity"
    score = "no candidates" if result.decision_score is None else f"{decision} {result.decision_score:.3f}"
    if result.alone and result.decision == "margin":
        score += " = its probability, no other individual in its shortlist"
    thresholds = f"{threshold} {result.threshold:.3f}"
    if result.new_below < result.threshold:  # the band where the model cannot place the photo
        thresholds += f", new below {result.new_below:.3f}" if result.new_below > 0 else ", none called new at this precision"
    lines = [f"{result.query}: {result.verdict} ({score}, {thresholds}; gallery: {result.gallery})"]
    for rank, c in enumerate(result.candidates, 1):
        local = f", inliers {c.inliers:.0f}/{c.matches:.0f}" if c.inliers is not None else ""
        drawing = f", {c.explanation_png}" if c.explanation_png else ""
        if drawn and not c.explanation_png:
            drawing = f", not drawn: {c.gallery_path} is gone (moved? `spotmatch catalogue relink --photos OLD=NEW`)"
        lines.append(f"  {rank}. {c.individual}  {label}{c.probability:.3f}  cosine {c.cosine:.3f}{local}"
                     f"  via image {c.gallery_image_id} {c.gallery_filename} ({candidate_place(c)}){drawing}")
    return lines


def candidate_place(candidate) -> str:
    """Where, when and which flank, each said as unknown rather than left out: a reviewer reads a missing
    station as "not recorded", never as "same as the others"."""
    station = candidate.station or "station unknown"
    camera = f" camera {candidate.camera}" if candidate.camera else ""
    return f"{station}{camera}, {candidate.captured_at or 'date unknown'}, {f'{candidate.side} flank' if candidate.side else 'flank unknown'}"


@catalogue_app.command("confirm")
def confirm(
    folder: Path = typer.Argument(..., help=FOLDER_HELP),
    photo: Optional[str] = typer.Argument(None, help="A photo file (added if new) or a catalogue image id."),
    image_id: Optional[int] = typer.Option(None, "--image-id", help="The catalogue image id (instead of PHOTO)."),
    individual: Optional[str] = typer.Option(None, help="The individual it shows (made if it does not exist)."),
    new: bool = typer.Option(False, "--new", help="It shows an individual not in the catalogue: make a new one."),
    who: str = typer.Option("cli", envvar="USER", help=WHO_HELP),
    station: Optional[str] = typer.Option(None, help="For a photo not in the catalogue yet: the station it was taken at."),
    camera: Optional[str] = typer.Option(None, help="For a photo not in the catalogue yet: its camera."),
    date: Optional[str] = typer.Option(None, "--date", help="For a photo not in the catalogue yet: when it was taken (YYYY-MM-DD[ HH:MM:SS]; default: its EXIF date)."),
    side: Optional[str] = typer.Option(None, help="For a photo not in the catalogue yet: the flank it shows (left or right)."),
) -> None:
    """Record who decided which individual a photo shows."""
    from spotmatch.catalogue.service import PhotoFacts, confirm_photo, open_engine
    from spotmatch.catalogue.store import reviewer
    from spotmatch.data.images import file_sha256
    from spotmatch.errors import SpotmatchError

    target = confirm_target(photo, image_id)
    if (individual is None) == (not new):
        raise SpotmatchError(f"{photo or image_id}: say either --individual NAME or --new, not both or neither")
    who = reviewer(who)
    facts = PhotoFacts(station, camera, date, side)
    if isinstance(target, int) and facts.given():
        raise SpotmatchError(f"image {target}: already in the catalogue, with the station, date and flank it was added with;"
                             f" confirm it without --station/--camera/--date/--side")
    catalogue = _open(folder)
    if isinstance(target, int):
        confirmed = catalogue.confirm(target, individual, who)
    else:
        added = catalogue.image_by_sha(file_sha256(target)) is None
        confirmed = confirm_photo(catalogue, open_engine(catalogue), target, individual, who, facts)
        if added:  # what the station, season and flank searches will know of it, from now on
            typer.echo(f"added as image {confirmed.image_id}: {stored_facts(catalogue.image(confirmed.image_id))}")
    typer.echo(confirmed.text(who))


def stored_facts(image) -> str:
    """Where, when and which flank a catalogue photo was recorded with, each said as unknown rather than left out;
    a missing date says what it costs."""
    from spotmatch.catalogue.store import has_capture_date

    station = (image["station"] or "station unknown") + (f" camera {image['camera']}" if image["camera"] else "")
    when = image["captured_at"] if has_capture_date(image["captured_at"]) else (
        "no capture date (no --date, no EXIF date): --since/--until searches leave it out")
    flank = f"{image['side']} flank" if image["side"] else "flank unknown"
    return f"{station}, {when}, {flank}"


def confirm_target(photo: str | None, image_id: int | None) -> int | Path:
    """The catalogue image id or the photo file `confirm` is about. A number that is also a file here is
    refused: relabelling the wrong image would go unnoticed."""
    from spotmatch.errors import SpotmatchError

    if (photo is None) == (image_id is None):
        said = f"{photo} and --image-id {image_id}" if photo is not None else "no photo"
        raise SpotmatchError(f"confirm: {said}; name either a photo (or image id) or --image-id, not both or neither")
    if image_id is not None:
        return image_id
    if not photo.isdigit():
        return Path(photo)
    if Path(photo).exists():
        raise SpotmatchError(f"{photo}: both a file here and a catalogue image id; write ./{photo} for the file,"
                             f" or --image-id {photo} for the catalogue image")
    return int(photo)


@catalogue_app.command("merge")
def merge(folder: Path = typer.Argument(..., help=FOLDER_HELP), keep: str = typer.Argument(..., help="Individual that stays."),
          absorb: str = typer.Argument(..., help="Individual whose images move to KEEP; it is deleted."),
          who: str = typer.Option("cli", envvar="USER", help=WHO_HELP)) -> None:
    """Two individuals are one animal: move ABSORB's images to KEEP."""
    moved = _open(folder).merge(keep, absorb, who)
    typer.echo(f"merged {absorb} into {keep} ({moved} images moved)")


@catalogue_app.command("split")
def split(folder: Path = typer.Argument(..., help=FOLDER_HELP),
          individual: str = typer.Argument(..., help="The individual the photos are filed under now."),
          image_ids: List[int] = typer.Argument(..., help="Catalogue image ids (see export) that show another animal."),
          into: Optional[str] = typer.Option(None, help="Name of the new individual (default: a fresh one)."),
          who: str = typer.Option("cli", envvar="USER", help=WHO_HELP)) -> None:
    """Some images of INDIVIDUAL show another animal: move them to a new individual."""
    name = _open(folder).split(individual, list(image_ids), into, who)  # refuses an id listed twice: the count is true
    typer.echo(f"moved {len(image_ids)} image(s) of {individual} to {name}")


@catalogue_app.command("rename")
def rename(folder: Path = typer.Argument(..., help=FOLDER_HELP), old: str = typer.Argument(..., help="The individual's name now."),
           new: str = typer.Argument(..., help="Its new name."),
           who: str = typer.Option("cli", envvar="USER", help=WHO_HELP)) -> None:
    """Rename an individual."""
    _open(folder).rename(old, new, who)
    typer.echo(f"renamed {old} to {new}")


@catalogue_app.command("relink")
def relink(folder: Path = typer.Argument(..., help=FOLDER_HELP),
           checkpoint: Optional[Path] = typer.Option(None, help="The catalogue's checkpoint at its new place (the same file, moved)."),
           fusion: Optional[Path] = typer.Option(None, help="Its calibration file at its new place, or one made again for the"
                                                            " catalogue's model (its thresholds then decide; recorded in the history)."),
           photos: Optional[str] = typer.Option(None, help="OLD=NEW: the photos stored under folder OLD are now under NEW."),
           who: str = typer.Option("cli", envvar="USER", help=WHO_HELP)) -> None:
    """Files moved (an archive, another disk or machine): point the catalogue at their new places; or take a
    calibration made again for its model."""
    from spotmatch.catalogue.service import relink_model
    from spotmatch.errors import SpotmatchError

    if checkpoint is None and fusion is None and photos is None:
        raise SpotmatchError("relink: nothing to do; name --checkpoint, --fusion and/or --photos OLD=NEW")
    if photos is not None and photos.count("=") != 1:
        raise SpotmatchError(f"--photos {photos!r}: write the two folders as OLD=NEW")
    catalogue = _open(folder)
    # Both checked before either is written: a refused command changes nothing.
    moved = catalogue.moved_photos(*(Path(part).absolute() for part in photos.split("="))) if photos is not None else None
    if checkpoint is not None or fusion is not None:
        relink_model(catalogue, checkpoint, fusion, who)
        typer.echo(f"the catalogue now reads {', '.join(str(p) for p in (checkpoint, fusion) if p is not None)}")
    if moved is not None:
        catalogue.relink_photos(moved, who)
        left = moved.stored - len(moved.found)
        typer.echo(f"{len(moved.found)} photo paths now under {moved.new}" + (f"; {left} stored under {moved.old} are not there (or"
                                                                                f" differ) and keep their path" if left else ""))


@catalogue_app.command("retire")
def retire(folder: Path = typer.Argument(..., help=FOLDER_HELP),
           individual: str = typer.Argument(..., help="The individual to leave out of searches (dead, gone)."),
           undo: bool = typer.Option(False, "--undo", help="Look for it again."),
           who: str = typer.Option("cli", envvar="USER", help=WHO_HELP)) -> None:
    """An individual is dead or gone: identify stops proposing it (its photos and history stay)."""
    _open(folder).retire(individual, who, undo)
    typer.echo(f"{individual} is {'looked for again' if undo else 'retired'} (by {who})")


@catalogue_app.command("export")
def export(folder: Path = typer.Argument(..., help=FOLDER_HELP), out: Path = typer.Option(..., help="CSV file to write."),
           competition: bool = typer.Option(False, "--competition", help="The competition's train.csv: filename, ground_truth.")) -> None:
    """Write every image with its individual and capture metadata (or the competition format) as CSV."""
    from spotmatch.catalogue.service import export_table
    from spotmatch.io import write_csv_atomic

    catalogue = _open(folder)
    _check_out(out, folder, [])
    table = export_table(catalogue, competition)
    write_csv_atomic(table, out, follow=True)
    say_done(f"wrote {len(table)} rows to {out}", out)


@catalogue_app.command("backup")
def backup(folder: Path = typer.Argument(..., help=FOLDER_HELP),
           out: Path = typer.Option(..., help="A new (or empty) folder for the backup, outside the catalogue; ideally on another disk.")) -> None:
    """Copy the catalogue while it may be in use: every committed decision and the photos uploaded in the review app.
    The copy is a catalogue itself: any command opens it; to restore, use it, or back it up to where you want it."""
    from spotmatch.catalogue.backup import backup_catalogue, refuse_backup_target

    catalogue = _open(folder)
    report = backup_catalogue(catalogue, refuse_backup_target(catalogue.folder, out))
    typer.echo(f"backed up {report.images} photos, {report.individuals} individuals and {report.decisions} recorded decisions"
               f" to {report.folder}" + (f"; photos uploaded in the review app, copied: {report.uploads}" if report.uploads else ""))
    if report.photos_elsewhere:
        typer.echo(f"{report.photos_elsewhere} catalogue photos lie outside the backup (the team's own folders, or files the"
                   f" catalogue lost) and were not copied: back them up too (`catalogue export` lists their paths;"
                   f" `catalogue relink --photos` follows a moved folder)")
    typer.echo(f"the backup reads the model where it is: {', '.join(report.model_files)}; keep these files too"
               f" (`catalogue relink` points a catalogue at moved copies)")


@catalogue_app.command("history")
def history(
    folder: Path = typer.Argument(..., help=FOLDER_HELP),
    image_id: Optional[int] = typer.Option(None, "--image-id", help="Only the decisions about this catalogue image."),
    photo: Optional[Path] = typer.Option(None, "--photo", help="Only the decisions about this photo file (found by its content)."),
    individual: Optional[str] = typer.Option(None, "--individual", help="Only the decisions about this individual (under any name it had)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the rows as CSV instead of printing them."),
) -> None:
    """Who decided what, and when: imports, confirmations, merges, splits, renames, retirements, relinks."""
    from spotmatch.data.images import file_sha256
    from spotmatch.errors import SpotmatchError
    from spotmatch.io import write_csv_atomic

    catalogue = _open(folder)
    if out is not None:
        _check_out(out, folder, [photo] if photo else [])
    if photo is not None:
        if image_id is not None:
            raise SpotmatchError(f"{photo}: name either --photo or --image-id, not both")
        known = catalogue.image_by_sha(file_sha256(photo))
        if known is None:
            raise SpotmatchError(f"{photo}: this photo is not in the catalogue (`spotmatch catalogue add` it first)")
        image_id = int(known["id"])
    table = catalogue.history(image_id, individual)
    if out is not None:
        write_csv_atomic(table, out, follow=True)
        say_done(f"wrote {len(table)} rows to {out}", out)
        return
    if table.empty:
        typer.echo("no decisions recorded")
        return
    table["photo"] = table["photo"].map(lambda path: Path(path).name if isinstance(path, str) else "-")
    typer.echo(table.astype(object).fillna("-").to_string(index=False))


@catalogue_app.command("stats")
def stats(folder: Path = typer.Argument(..., help=FOLDER_HELP)) -> None:
    """Counts, schema version and the model the catalogue is bound to, after a check of the whole database."""
    from spotmatch.errors import SpotmatchError

    catalogue = _open(folder)
    problems = catalogue.integrity_problems()  # reads every page: SQLite itself only notices damage where a command reads
    if problems:
        raise SpotmatchError(f"{catalogue.folder / 'catalogue.db'}: damaged ({problems[0]}{f'; {len(problems) - 1} more' if len(problems) > 1 else ''});"
                             f" restore it from a backup (the folder `catalogue backup` made is a catalogue: use it)")
    for key, value in catalogue.stats().items():
        typer.echo(f"{key}: {value}")
    typer.echo("integrity: ok")


@app.command()
def serve(
    folder: Path = typer.Argument(..., help=FOLDER_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; the default is reachable from this machine only."),
    port: int = typer.Option(8765, min=1, max=65535, help="Port."),
    shortlist_k: Optional[int] = typer.Option(None, help="Catalogue images re-scored with keypoints per photo (default: as many as the calibration file was fit with)."),
    who: str = typer.Option("cli", envvar="USER", help="Reviewer name recorded with confirmations (the page can override it)."),
    token: Optional[str] = typer.Option(None, envvar="SPOTMATCH_TOKEN", help="Access token the page needs (default: a new random one each start, printed in the address)."),
) -> None:
    """Review web app: pick or upload a photo, compare candidates with their match drawings, confirm or mark as new."""
    import uvicorn

    from spotmatch.errors import SpotmatchError
    from spotmatch.web.app import LOOPBACK_NAMES, ServeConfig, address, allowed_hosts_for, create_app, listening_socket

    conf = ServeConfig(catalogue=folder, shortlist_k=shortlist_k, default_who=who, allowed_hosts=allowed_hosts_for(host))
    if token is not None:
        if len(token) < 16:
            raise SpotmatchError(f"--token: {len(token)} characters is guessable; use at least 16, or leave it out for a random one")
        conf.token = token
    web_app = create_app(conf)
    listening = listening_socket(host, port)
    typer.echo(f"serving {folder} on {address(host, port)}?token={conf.token}")
    if host not in LOOPBACK_NAMES:
        typer.echo(f"note: listening on {host}, reachable from other machines: anyone who has this address with its token"
                   f" can relabel the catalogue; share it only with the team, on a network you trust (plain http)")
    # uvicorn shuts down cleanly on SIGTERM, then raises it again: a stopped server is a clean exit, not an interrupted job.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    uvicorn.Server(uvicorn.Config(web_app, host=host, port=port, log_level="warning")).run(sockets=[listening])
