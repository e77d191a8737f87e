"""The catalogue: store, CLI and safety (real kill mid-add, two writers at once, corrupt files) on real frames."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, SNOW

CLI = [sys.executable, "-c", "from spotmatch.cli import main; main()"]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def fusion_file(tmp_path_factory, snow_subset_csv, tiny_checkpoint) -> Path:
    """A calibration of the tiny model on the subset, so the catalogue re-scores with keypoints."""
    # In-process, as `spotmatch calibrate --top-k 5 --no-compare-rerankers` does it (a subprocess would re-import torch).
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.engine import calibrate as calibration
    from spotmatch.engine.engine import EngineConfig
    from spotmatch.evaluation.run import split_for
    from spotmatch.global_embed.embed import EmbedConfig, Embedder

    out_dir = tmp_path_factory.mktemp("calibration")
    dataset = load_dataset(snow_subset_csv)
    split, split_by, _ = split_for(dataset, SplitConfig(by="identity"), tiny_checkpoint)
    embedder = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(device="cpu", num_workers=0, cache_dir=str(out_dir / "cache"), progress=False))
    result = calibration.main(dataset, split, split_by, embedder, EngineConfig(shortlist_k=5, cache_dir=str(out_dir / "cache")),
                              calibration.CalibrateConfig(rerankers=()), out_dir)
    return Path(result["fusion_path"])


@pytest.fixture(scope="module")
def gallery_and_queries(tmp_path_factory, snow_subset_csv) -> tuple[Path, list[Path]]:
    """The subset minus one frame of each of two cats (the queries), as a labelled CSV."""
    table = pd.read_csv(snow_subset_csv, dtype=str, keep_default_na=False)
    held_out = [table[table["identity"] == "Cat1"].index[-1], table[table["identity"] == "Cat5"].index[-1]]
    folder = tmp_path_factory.mktemp("gallery")
    table.drop(index=held_out).to_csv(folder / "labels.csv", index=False)
    (folder / "images").symlink_to(SNOW / "images")
    return folder / "labels.csv", [SNOW / "images" / table.loc[i, "filename"] for i in held_out]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, tiny_checkpoint, fusion_file, gallery_and_queries):
    from spotmatch.catalogue.service import add_images, init_catalogue, open_engine, sources_from_csv

    folder = tmp_path_factory.mktemp("catalogue") / "cat"
    store = init_catalogue(folder, tiny_checkpoint, fusion_file)
    engine = open_engine(store, shortlist_k=5)
    report = add_images(store, engine.embedder, engine.local, sources_from_csv(gallery_and_queries[0]))
    assert report.added == 17 and not report.failed
    return store, engine


def small_folder(tmp_path: Path, snow_subset_csv: Path, count: int) -> Path:
    """`count` real frames linked into a folder (links: the tests never copy the data set)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in pd.read_csv(snow_subset_csv)["filename"].head(count):
        (folder / name).symlink_to(SNOW / "images" / name)
    return folder


def test_add_is_idempotent_and_stores_embeddings_and_metadata(catalogue, gallery_and_queries):
    from spotmatch.catalogue.service import add_images, sources_from_csv
    from spotmatch.catalogue.store import blob_to_embedding

    store, engine = catalogue
    again = add_images(store, engine.embedder, engine.local, sources_from_csv(gallery_and_queries[0]))
    assert (again.added, again.already_there) == (0, 17)
    row = store.db.execute("SELECT * FROM images ORDER BY id LIMIT 1").fetchone()
    stored = blob_to_embedding(row["embedding"])
    assert stored.dtype == np.float32 and np.allclose(stored, engine.embedder.embed([row["path"]])[0], atol=1e-6)
    assert row["station"].startswith("S") and row["camera"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}", row["captured_at"])  # the CSV's "2012-7-22", "1-53-20", as ISO
    assert row["feature_key"] == engine.local.extractor.conf_name
    stats = store.stats()
    assert (stats["individuals"], stats["images"], stats["confirmations"], stats["schema_version"]) == (3, 17, 17, 5)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_identify_ranks_individuals_with_calibrated_probability(catalogue, gallery_and_queries, tmp_path):
    from spotmatch.catalogue.service import IdentifyConfig, identify

    store, engine = catalogue
    results = identify(store, engine, gallery_and_queries[1], IdentifyConfig(top_k=3, explain_dir=tmp_path))
    assert len(results) == 2
    for result in results:
        names = [c.individual for c in result.candidates]
        # one line per individual in the 5-image shortlist, its best image speaking for it
        assert len(set(names)) == len(names) >= 1 and set(names) <= {"Cat1", "Cat5", "Cat21"}
        probabilities = [c.probability for c in result.candidates]
        assert probabilities == sorted(probabilities, reverse=True) and all(0 <= p <= 1 for p in probabilities)
        assert result.threshold == pytest.approx(engine.fusion.threshold)
        assert result.verdict in ("new individual", f"match: {names[0]}", f"not sure: best candidate {names[0]}")
        # the fusion file decides on the best individual's lead over the next one (shortlist of 5: all 3 cats listed)
        assert result.decision == engine.fusion.decision == "margin"
        assert result.decision_score == pytest.approx(probabilities[0] - (probabilities[1] if len(probabilities) > 1 else 0.0))
        assert result.new_below == engine.fusion.new_threshold <= result.threshold  # calibrated: a file of version 6
        assert (result.verdict == "new individual") == (result.decision_score < result.new_below)
        assert any(c.inliers is not None for c in result.candidates)  # keypoint evidence on the shortlist
        assert Path(result.candidates[0].explanation_png).stat().st_size > 1000
        assert result.known_image_id is None and result.calibrated


def test_identify_restricted_to_a_station_a_season_a_flank_and_living_individuals(catalogue, gallery_and_queries):
    from spotmatch.catalogue.service import IdentifyConfig, identify
    from spotmatch.catalogue.store import GalleryRestriction
    from spotmatch.errors import SpotmatchError

    store, engine = catalogue
    query = gallery_and_queries[1][0]

    def candidates(**restriction):
        conf = IdentifyConfig(top_k=10, restriction=GalleryRestriction.from_text(**restriction))
        return identify(store, engine, [query], conf)[0].candidates

    everyone = candidates()
    gallery = store.images_table().set_index("image_id")
    for c in everyone:  # where and when each catalogue photo was taken travels with its candidate
        image = gallery.loc[c.gallery_image_id]
        assert (c.gallery_filename, c.station, c.captured_at) == (image["filename"], image["station"], image["captured_at"])
    station = everyone[-1].station  # not the best candidate's: the restriction has to change the answer
    at_station = candidates(stations=[station])
    assert at_station and {c.station for c in at_station} == {station}
    assert {c.individual for c in at_station} == set(gallery[gallery["station"] == station]["individual"])

    day = everyone[0].captured_at[:10]
    that_day = candidates(since=day, until=day)
    assert that_day and all(c.captured_at.startswith(day) for c in that_day)
    with pytest.raises(SpotmatchError, match="not a date; write it as YYYY-MM-DD"):
        GalleryRestriction.from_text(since="22/07/2012")

    try:  # flanks as a CSV's side column would set them: the best candidate's photos are the right flank
        best = everyone[0].individual
        store.db.execute("UPDATE images SET side = 'right' WHERE individual_id = ?", (store.individual_id(best),))
        left = candidates(side="left")
        assert best not in {c.individual for c in left} and {c.side for c in left} == {None}
        assert best in {c.individual for c in candidates(side="right")}
        # a round's photos each with their own flank (from its CSV); the unknown one keeps the restriction's
        round_results = identify(store, engine, [query, query], IdentifyConfig(top_k=10), sides=["left", None])
        assert [r.gallery for r in round_results] == ["every individual not retired, left flank or unknown", "every individual not retired"]
        assert best not in {c.individual for c in round_results[0].candidates}
        assert [c.gallery_image_id for c in round_results[1].candidates] == [c.gallery_image_id for c in everyone]

        store.retire(best, who="ana")
        assert best not in {c.individual for c in candidates()}
        assert best in {c.individual for c in candidates(include_retired=True)}
        assert store.stats()["retired_individuals"] == 1
        for named in ([best], [best, everyone[-1].individual]):  # named beside another, it is not dropped unseen either
            with pytest.raises(SpotmatchError, match=f"'{best}' retired; add --include-retired to search it, or leave it out") as nothing:
                candidates(individuals=named)
            assert "\n" not in str(nothing.value)
        for typo, message in (({"individuals": [best, "Catt21"]}, "no individual named 'Catt21' in the catalogue; check the spelling"),
                              ({"stations": ["S99"]}, "no station named 'S99' in the catalogue")):
            with pytest.raises(SpotmatchError, match=message):  # a typo never narrows the search unseen
                candidates(**typo)
    finally:
        store.db.execute("UPDATE images SET side = NULL")
        store.retire(best, who="ana", undo=True)
    assert [c.gallery_image_id for c in candidates()] == [c.gallery_image_id for c in everyone]


def test_the_verdict_never_calls_new_what_the_gallery_left_out_or_the_catalogue_holds(catalogue, gallery_and_queries):
    """"new individual" makes a team `confirm --new`, a second entry for an animal it has: it is said only where
    every catalogued individual was compared. A restriction that left animals out says which; a photo already in
    the catalogue says so; a round photo whose flank has no catalogue photo is told, the others still searched."""
    from spotmatch.catalogue.service import IdentifyConfig, QueryResult, identify
    from spotmatch.catalogue.store import GalleryRestriction

    store, engine = catalogue
    query = gallery_and_queries[1][0]
    (everyone,) = identify(store, engine, [query], IdentifyConfig(top_k=10))
    assert everyone.left_out == [] and everyone.verdict in ("new individual", f"match: {everyone.candidates[0].individual}",
                                                            f"not sure: best candidate {everyone.candidates[0].individual}")
    best = everyone.candidates[0].individual
    try:
        store.db.execute("UPDATE images SET side = 'right' WHERE individual_id = ?", (store.individual_id(best),))
        (left,) = identify(store, engine, [query], IdentifyConfig(top_k=10, restriction=GalleryRestriction(side="left")))
        assert left.left_out == [best] and best not in {c.individual for c in left.candidates}
        assert left.named is not None or left.verdict.startswith(f"no match in this gallery; not compared: {best}")
        store.db.execute("UPDATE images SET side = 'left' WHERE side IS NULL")
        # a round: one photo of the right flank (only `best` is catalogued from it), one of a flank nobody has
        round_results = identify(store, engine, [query, query], IdentifyConfig(top_k=10, restriction=GalleryRestriction(individuals=(best,))),
                                 sides=["right", "left"])
        assert [c.individual for c in round_results[0].candidates] == [best] and not round_results[0].empty_gallery
        assert round_results[0].alone  # one individual in its shortlist: its margin is its probability
        assert round_results[1].empty_gallery and round_results[1].candidates == [] and round_results[1].named is None
        assert round_results[1].verdict == "nothing to compare with: no catalogue photo in this gallery"
    finally:
        store.db.execute("UPDATE images SET side = NULL")
    catalogued = store.images_table().iloc[0]
    (again,) = identify(store, engine, [Path(catalogued["path"])], IdentifyConfig(top_k=3))
    assert again.named is None and again.verdict == f"already catalogued as image {catalogued['image_id']}, {catalogued['individual']}"
    # a lead too small to name one animal while the best one's probability alone would name it: undecided, not new
    for shown in (2, 1):  # the runner-up decides it, listed or not (`--top-k 1`)
        tied = [everyone.candidates[0], replace(everyone.candidates[0], individual="Twin")][:shown]
        undecided = QueryResult("q.jpg", "sha", tied, threshold=0.4, decision="margin", decision_score=0.0,
                                best_threshold=tied[0].probability, runner_up="Twin")
        assert undecided.named is None and undecided.verdict == f"undecided: {best} or Twin" and not undecided.alone


def test_shortlist_with_at_most_one_image_per_individual(catalogue, gallery_and_queries):
    from spotmatch.catalogue.service import IdentifyConfig, identify

    store, engine = catalogue
    query = gallery_and_queries[1][1]
    ids, _ = store.identified_images()
    cosine = store.embeddings(ids) @ engine.embedder.embed([query])[0]
    individual_of = store.images_table().set_index("image_id")["individual"]
    ranked = ids[np.argsort(-cosine, kind="stable")]
    firsts = pd.Series(individual_of.loc[ranked].to_numpy(), index=ranked).drop_duplicates()  # each cat's best image
    (limited,) = identify(store, engine, [query], IdentifyConfig(top_k=10, per_individual=1))
    (plain,) = identify(store, engine, [query], IdentifyConfig(top_k=10))
    assert {c.gallery_image_id for c in limited.candidates} == set(firsts.index)  # all 3 cats, each by its best image
    assert len(plain.candidates) < len(limited.candidates)  # the 5 nearest frames leave a cat out
    # the rank counts every catalogue image above it, as in calibration, not only the shortlisted ones
    assert sorted(c.global_rank for c in limited.candidates) == sorted(list(ranked).index(i) for i in firsts.index)


def test_capture_times_become_iso_and_sides_flanks(tmp_path, snow_subset_csv):
    from spotmatch.catalogue.service import sources_from_csv
    from spotmatch.catalogue.store import has_capture_date, iso_capture_time
    from spotmatch.errors import SpotmatchError

    assert has_capture_date("2012-7-22 dusk") and not has_capture_date("2012-02-30") and not has_capture_date("16-13-56")
    assert iso_capture_time("2012:07:22 01:53:20") == "2012-07-22T01:53:20"  # EXIF
    assert iso_capture_time("2012-7-22 1-53-20") == iso_capture_time("2012-07-22T01:53:20") == "2012-07-22T01:53:20"
    assert iso_capture_time("2012-7-22") == "2012-07-22"
    for unreadable in ("22/07/2012", "2012-13-01 00:00:00", "dawn"):  # kept as written, never dropped
        assert iso_capture_time(unreadable) == unreadable
    # A 12-hour clock, with or without seconds; a date followed by words keeps the words, its date as ISO.
    assert iso_capture_time("2012-08-19 4:13 PM") == "2012-08-19T16:13:00"
    assert iso_capture_time("2012-8-25 4:16 PM") == "2012-08-25T16:16:00"
    assert iso_capture_time("2012-8-25 12:05:09 am") == "2012-08-25T00:05:09"
    assert iso_capture_time("2012-8-25 12:05 p.m.") == "2012-08-25T12:05:00"
    assert iso_capture_time("2012-7-14 dusk") == "2012-07-14 dusk"
    assert iso_capture_time("2012-8-25 16:16 PM") == "2012-08-25 16:16 PM"  # no such hour: the date alone is read
    for unset in ("0000:00:00 00:00:00", "    :  :     :  :  ", ""):  # EXIF's "not set": date unknown
        assert iso_capture_time(unset) is None
    table = pd.read_csv(snow_subset_csv, dtype=str, keep_default_na=False).head(3)
    table["side"] = ["Left", "", "r"]
    table.to_csv(tmp_path / "sides.csv", index=False)
    assert [s.side for s in sources_from_csv(tmp_path / "sides.csv", SNOW / "images")] == ["left", None, "right"]
    table["side"] = ["left", "up", "right"]
    table.to_csv(tmp_path / "sides.csv", index=False)
    with pytest.raises(SpotmatchError, match=r"sides.csv line 3: side 'up' is not a flank; use left, right"):
        sources_from_csv(tmp_path / "sides.csv", SNOW / "images")

    # Column names in any case, as for filename and identity: a "Station" column is the station
    capitalised = table.drop(columns=["side"]).rename(columns=str.capitalize)
    capitalised.to_csv(tmp_path / "caps.csv", index=False)
    source = sources_from_csv(tmp_path / "caps.csv", SNOW / "images")[0]
    first = table.iloc[0]
    assert (source.station, source.captured_at) == (first["station"], f"{first['date']} {first['time']}")
    capitalised.assign(Date=["2012-7-22", "22/07/2012", "2012-7-23"]).to_csv(tmp_path / "caps.csv", index=False)
    with pytest.raises(SpotmatchError, match=r"caps.csv line 3: date '22/07/2012' does not read as year-month-day"):
        sources_from_csv(tmp_path / "caps.csv", SNOW / "images")


def test_links_that_lead_nowhere_are_skipped_by_their_own_name(tmp_path, catalogue):
    """A dangling or looping link in a folder is reported as skipped, under the name the folder gives it, and
    the rest is added; never a traceback, never silently passed over."""
    from spotmatch.catalogue.service import add_images, sources_from_path

    store, engine = catalogue
    folder = tmp_path / "links"
    folder.mkdir()
    (folder / "loop1.jpg").symlink_to("loop2.jpg")
    (folder / "loop2.jpg").symlink_to("loop1.jpg")
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    report = add_images(store, engine.embedder, engine.local, sources_from_path(folder))
    assert report.added == 0 and sorted(Path(path).name for path, _ in report.failed) == ["gone.jpg", "loop1.jpg", "loop2.jpg"]
    assert all("\n" not in reason and str(folder) in reason for _, reason in report.failed)


def test_a_file_name_that_is_not_utf8_is_skipped_in_one_printable_line(tmp_path, catalogue):
    """SQLite keeps names as UTF-8 text: such a name is reported (its odd byte written as \\xe9) and the rest is
    added; identify refuses it in one line. `explain` draws it (OpenCV's font crashed on it)."""
    import os
    import shutil

    from spotmatch.catalogue.service import add_images, identify, sources_from_path
    from spotmatch.errors import SpotmatchError
    from test_cli import run_cli

    store, engine = catalogue
    folder = tmp_path / "latin1"
    folder.mkdir()
    photo = next(iter(sorted((SNOW / "images").glob("*.JPG"))))
    odd = folder / os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(photo, odd)
    report = add_images(store, engine.embedder, engine.local, sources_from_path(folder))
    assert report.added == 0 and [path for path, _ in report.failed] == [str(folder / "caf\\xe9.jpg")]
    assert "the file name is not valid UTF-8, so the catalogue cannot record it; rename the file" in report.failed[0][1]
    with pytest.raises(SpotmatchError, match="caf\\\\xe9.jpg: the file name is not valid UTF-8"):
        identify(store, engine, [odd])
    drawn = run_cli("explain", odd, photo, "--out", tmp_path / "x.png", "--cache-dir", "")
    assert drawn.returncode == 0 and (tmp_path / "x.png").is_file(), drawn.stderr


def test_identify_a_catalogue_photo_never_matches_itself(catalogue):
    from spotmatch.catalogue.service import identify

    store, engine = catalogue
    row = store.db.execute("SELECT id, path FROM images ORDER BY id LIMIT 1").fetchone()
    result = identify(store, engine, [Path(row["path"])])[0]
    assert result.known_image_id == row["id"]
    assert row["id"] not in [c.gallery_image_id for c in result.candidates]


def test_index_is_persisted_and_rebuilt_from_the_database(catalogue):
    store, _ = catalogue
    index, ids = store.search_index()
    assert store.index_path.is_file() and index.ntotal == len(ids) == 17
    store.index_path.unlink()
    rebuilt, rebuilt_ids = store.search_index()
    assert np.array_equal(ids, rebuilt_ids) and store.index_path.is_file()
    assert np.allclose(rebuilt.reconstruct(0), store.embeddings(ids[:1])[0])
    store.index_path.write_bytes(b"garbage")  # a damaged cache is rebuilt, not fatal
    assert store.search_index()[0].ntotal == 17
    store.index_path.write_bytes(store.index_path.read_bytes()[:100])  # cut short, as by a full disk
    assert store.search_index()[0].ntotal == 17


def test_an_index_from_other_photos_with_the_same_ids_is_rebuilt(tmp_path):
    """Another catalogue's index (or a backup's) holds the same image ids over other photos: used, it would
    answer with their embeddings. Its key (ids, content hashes, model) does not match, so it is rebuilt."""
    mine = stand_in_catalogue(tmp_path / "mine", {"Cat1": 3})
    other = stand_in_catalogue(tmp_path / "other", {"Dog1": 3})
    other.search_index()
    mine.index_path.write_bytes(other.index_path.read_bytes())
    index, ids = mine.search_index()
    assert mine.index_path.read_bytes() != other.index_path.read_bytes()  # rebuilt and saved with its own key
    assert np.allclose(index.reconstruct(0), mine.embeddings(ids[:1])[0])
    again = mine.index_path.read_bytes()
    mine.search_index()
    assert mine.index_path.read_bytes() == again  # its own index is kept, not rebuilt on every search


def test_review_decisions_are_recorded_with_who_and_when(catalogue, gallery_and_queries):
    from spotmatch.catalogue.service import confirm_photo, export_table
    from spotmatch.errors import SpotmatchError

    store, engine = catalogue
    query = gallery_and_queries[1][0]
    confirmed = confirm_photo(store, engine, query, None, who="ana")
    image_id, name = confirmed.image_id, confirmed.individual
    assert name.startswith("individual-") and confirmed.previous is None  # added by confirm: never identified
    # Re-filing says what it undid, so that a mistaken confirm can be seen and reverted.
    refiled = store.confirm(image_id, "Cat2", who="ana")
    assert (refiled.previous, refiled.individual) == (name, "Cat2")
    assert "was " + name in refiled.text("ana")
    assert store.confirm(image_id, name, who="ana").previous == "Cat2"
    assert store.image(image_id)["individual_id"] == store.individual_id(name)
    assert store.merge("Cat1", name, who="ben") == 1
    with pytest.raises(SpotmatchError, match=f"no individual named '{name}'; the names are in"):  # merged away
        store.individual_id(name)
    new_name = store.split("Cat1", [image_id], "Cat1b", who="ana")
    store.rename(new_name, " Cat99 ", who="ana")  # surrounding spaces are not part of a name
    for blank in ("", "   "):
        with pytest.raises(SpotmatchError, match="individual name .* is empty"):
            store.rename("Cat99", blank, who="ana")
    with pytest.raises(SpotmatchError, match="individual name .* is empty"):
        store.confirm(image_id, " ", who="ana")
    assert store.individual_id(" Cat99") == store.individual_id("Cat99")
    actions = store.db.execute("SELECT action, who, at FROM confirmations WHERE image_id = ? ORDER BY id", (image_id,)).fetchall()
    assert [(a["action"], a["who"]) for a in actions] == [("new", "ana"), ("confirm", "ana"), ("confirm", "ana"), ("merge", "ben"),
                                                     ("split", "ana")]
    assert all(a["at"].startswith("20") for a in actions)
    # The history a reviewer reads back: by image, and by individual under every name it had.
    assert store.history(image_id=image_id)["action"].tolist() == ["new", "confirm", "confirm", "merge", "split"]
    assert store.history(individual="Cat99")["action"].tolist() == ["split", "rename"]  # split as Cat1b, renamed since
    merged_away = store.history(individual=name)
    assert merged_away["action"].tolist() == ["new", "confirm"]
    assert [Path(photo).name for photo in merged_away["photo"]] == [query.name] * 2  # stored resolved: compare names
    with pytest.raises(SpotmatchError, match="no individual named 'Cat404' now or in the history"):
        store.history(individual="Cat404")
    exported = export_table(store, competition=True)
    assert list(exported.columns) == ["filename", "ground_truth"]
    assert exported.loc[exported["filename"] == query.name, "ground_truth"].item() == "Cat99"
    assert store.integrity_problems() == []


def test_init_refuses_a_calibration_of_another_local_stage(tmp_path, tiny_checkpoint, fusion_file):
    from spotmatch.catalogue.service import init_catalogue
    from spotmatch.errors import SpotmatchError

    with pytest.raises(SpotmatchError, match="calibrated for local stage 'rootsift-[^']*', not 'disk-"):
        init_catalogue(tmp_path / "cat", tiny_checkpoint, fusion_file, extractor="disk")
    assert not (tmp_path / "cat").exists()  # refused before anything was written


def test_identify_rescores_as_many_images_as_the_calibration_was_fit_with(catalogue, gallery_and_queries):
    """The probabilities and the "new individual" threshold hold for the shortlist length they were fit
    on (5 here): identify takes it from the calibration file and refuses another."""
    from spotmatch.catalogue.service import open_engine

    store, _ = catalogue
    assert open_engine(store).conf.shortlist_k == 5  # not the default 20
    refused = run_cli("catalogue", "identify", store.folder, gallery_and_queries[1][0], "--shortlist-k", "20")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "re-scoring 5 images per query, not 20" in refused.stderr and "calibrate --top-k 20" in refused.stderr


def test_cli_workflow_and_one_line_errors(tmp_path, tiny_checkpoint, gallery_and_queries):
    from spotmatch.catalogue.service import add_images, init_catalogue, open_engine, sources_from_csv
    from spotmatch.errors import SpotmatchError

    folder = tmp_path / "cat"
    store = init_catalogue(folder, tiny_checkpoint, None)  # `catalogue add` runs as a real CLI process in the kill test
    empty = run_cli("catalogue", "identify", folder, gallery_and_queries[1][0])
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1 and "no identified images yet" in empty.stderr
    engine = open_engine(store)
    assert add_images(store, engine.embedder, engine.local, sources_from_csv(gallery_and_queries[0])).added == 17
    found = run_cli("catalogue", "identify", folder, *gallery_and_queries[1], tmp_path / "missing.jpg")
    assert found.returncode == 2 and "missing.jpg: image file not found" in found.stderr
    (tmp_path / "drawings").touch()
    found = run_cli("catalogue", "identify", folder, *gallery_and_queries[1], "--explain-dir", tmp_path / "drawings")
    assert found.returncode == 2 and found.stderr.count("\n") == 1 and "--explain-dir" in found.stderr and "is a file" in found.stderr
    found = run_cli("catalogue", "identify", folder, *gallery_and_queries[1], "--top-k", "2")
    assert found.returncode == 0, found.stderr
    # no fusion: cosine only, a similarity that must not read as a probability
    assert found.stdout.count("  1. ") == 2 and "p=" not in found.stdout and found.stdout.count("  similarity ") >= 2
    assert found.stdout.count(", uncalibrated threshold 0.500; ") == 2
    assert "gallery: every individual not retired" in found.stdout
    assert re.search(r"\.JPG \(S\d+ camera \d+, 20\d\d-\d\d-\d\dT[\d:]+, flank unknown\)", found.stdout)  # unknown, not left out
    stored = pd.read_csv(gallery_and_queries[0]).iloc[0]
    known = run_cli("catalogue", "identify", folder, SNOW / "images" / stored["filename"], "--top-k", "1")
    assert re.search(rf": already catalogued as image \d+, {stored['identity']} \(", known.stdout), known.stdout
    round_csv = tmp_path / "round.csv"
    pd.DataFrame({"filename": [p.name for p in gallery_and_queries[1]], "side": ["left", ""]}).to_csv(round_csv, index=False)
    found = run_cli("catalogue", "identify", folder, round_csv, "--images", SNOW / "images", "--top-k", "2", "--out", tmp_path / "round-results.csv")
    assert found.returncode == 0, found.stderr
    results = pd.read_csv(tmp_path / "round-results.csv")
    assert list(results["photo"].drop_duplicates().map(lambda p: Path(p).name)) == [p.name for p in gallery_and_queries[1]]
    assert set(results["rank"]) <= {1, 2} and results["gallery_filename"].str.endswith(".JPG").all() and not results["calibrated"].any()
    # the candidate's photo facts are named as the gallery photo's, never as the query's
    assert results["gallery_station"].str.startswith("S").all() and "station" not in results.columns
    written = pd.read_csv(tmp_path / "round-results.csv", dtype=str)
    assert written["global_rank"].str.fullmatch(r"\d+").all()  # counts as counts, not 3.0
    assert results.groupby("photo", sort=False)["gallery"].first().str.endswith("left flank or unknown").tolist() == [True, False]
    retired = run_cli("catalogue", "retire", folder, "Cat21")
    assert retired.returncode == 0 and "Cat21 is retired" in retired.stdout
    history = run_cli("catalogue", "history", folder, "--individual", "Cat21")
    assert history.returncode == 0, history.stderr
    assert history.stdout.splitlines()[-1].split()[2:3] == ["retire"] and " import " in history.stdout
    of_photo = run_cli("catalogue", "history", folder, "--photo", SNOW / "images" / stored["filename"], "--out", tmp_path / "h.csv")
    assert of_photo.returncode == 0, of_photo.stderr
    assert pd.read_csv(tmp_path / "h.csv")[["action", "individual"]].values.tolist() == [["import", stored["identity"]]]
    not_there = run_cli("catalogue", "history", folder, "--photo", gallery_and_queries[1][0])
    assert not_there.returncode == 2 and "is not in the catalogue" in not_there.stderr and not_there.stderr.count("\n") == 1
    nothing = run_cli("catalogue", "identify", folder, gallery_and_queries[1][0], "--individual", "Cat21")
    assert nothing.returncode == 2 and nothing.stderr.count("\n") == 1 and "every individual" not in nothing.stderr
    assert "'Cat21' retired; add --include-retired" in nothing.stderr
    exported = run_cli("catalogue", "export", folder, "--out", tmp_path / "all.csv")
    assert exported.returncode == 0
    assert len(pd.read_csv(tmp_path / "all.csv")) == 17
    for own_file in (folder / "catalogue.db", folder / "index.faiss"):  # the catalogue itself is never an output
        refused = run_cli("catalogue", "export", folder, "--out", own_file)
        assert refused.returncode == 2 and "is also read by this command" in refused.stderr, refused.stderr
    refused = run_cli("catalogue", "identify", folder, gallery_and_queries[1][0], "--out", gallery_and_queries[1][0])
    assert refused.returncode == 2 and "is also read by this command" in refused.stderr
    assert _image_count(folder / "catalogue.db") == 17 and store.integrity_problems() == []
    conflicting = tmp_path / "conflicting.csv"
    pd.DataFrame({"filename": [gallery_and_queries[1][0].name] * 2, "identity": ["Cat1", "Cat5"]}).to_csv(conflicting, index=False)
    with pytest.raises(SpotmatchError, match="is labelled as different individuals on lines 2, 3"):
        sources_from_csv(conflicting, SNOW / "images")
    renamed = run_cli("catalogue", "rename", folder, "Cat5", "Cat1")
    assert renamed.returncode == 2 and "already exists; merge" in renamed.stderr
    with sqlite3.connect(folder / "catalogue.db") as db:  # as if the catalogue came from a model of another width
        db.execute("UPDATE meta SET value = '999' WHERE key = 'embedding_dim'")
    with pytest.raises(SpotmatchError, match="999 dimensions but this model gives") as refused:
        add_images(store, engine.embedder, engine.local, sources_from_csv(gallery_and_queries[0]))
    assert "\n" not in str(refused.value)


def test_add_never_relabels_a_stored_photo_and_bad_catalogue_inputs_are_one_line(tmp_path, catalogue, gallery_and_queries,
                                                                                  tiny_checkpoint):
    import torch

    from spotmatch.catalogue.service import init_catalogue, open_engine
    from spotmatch.catalogue.store import Catalogue
    from spotmatch.errors import SpotmatchError

    store, _ = catalogue
    labels = pd.read_csv(gallery_and_queries[0], dtype=str, keep_default_na=False).head(2)
    stored = labels["identity"].iloc[0]
    other = "Cat5" if stored != "Cat5" else "Cat1"
    relabelled = tmp_path / "relabelled.csv"
    labels.assign(identity=[other, labels["identity"].iloc[1]]).to_csv(relabelled, index=False)
    result = run_cli("catalogue", "add", store.folder, relabelled, "--images", SNOW / "images")
    assert result.returncode == 1 and "added 0, already there 1, skipped 1" in result.stdout  # the rest goes in; the exit says not all
    assert re.search(f"already in the catalogue as image \\d+ of {stored}, but the CSV says {other}; fix the CSV", result.stderr)
    assert store.images_table().set_index("filename").loc[labels["filename"].iloc[0], "individual"] == stored

    header_only = tmp_path / "round.csv"
    header_only.write_text("filename,side\n")
    result = run_cli("catalogue", "identify", store.folder, header_only)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "round.csv: no photos under the header" in result.stderr
    (tmp_path / "notes.txt").write_text("not a folder")
    result = run_cli("catalogue", "init", tmp_path / "notes.txt", "--checkpoint", tiny_checkpoint)
    assert result.returncode == 2 and "notes.txt: a file, not a folder" in result.stderr

    # The catalogue's checkpoint file replaced by another model: named as such, not as "use the catalogue's checkpoint",
    # nor as "the calibration file is for another embedder" (calibrating again would not fix the catalogue).
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(Path(tiny_checkpoint).read_bytes())
    init_catalogue(tmp_path / "cat", checkpoint, store.settings().fusion).close()
    payload = torch.load(checkpoint, weights_only=True)
    payload["model"] = {name: weight + 0.01 if weight.is_floating_point() else weight for name, weight in payload["model"].items()}
    torch.save(payload, checkpoint)
    with pytest.raises(SpotmatchError, match="best.pt: changed since catalogue .* put the original file back"):
        open_engine(Catalogue.open(tmp_path / "cat"))


def test_the_adding_table_added_again_after_a_rename_finds_its_photos_there(tmp_path, tiny_checkpoint, gallery_and_queries):
    """A reviewer's rename changes a photo's individual, not what its adding table said: that table added
    again (a run interrupted and re-run) finds the photos already there; another label is still refused."""
    from spotmatch.catalogue.service import add_images, init_catalogue, open_engine, sources_from_csv

    labels = pd.read_csv(gallery_and_queries[0], dtype=str, keep_default_na=False).head(2)
    table = tmp_path / "two.csv"
    labels.to_csv(table, index=False)
    store = init_catalogue(tmp_path / "cat", tiny_checkpoint, None)
    engine = open_engine(store)
    assert add_images(store, engine.embedder, engine.local, sources_from_csv(table, SNOW / "images")).added == 2
    store.rename(labels["identity"].iloc[0], "Leo", who="test")
    again = add_images(store, engine.embedder, engine.local, sources_from_csv(table, SNOW / "images"))
    assert (again.added, again.already_there, again.failed) == (0, 2, [])
    labels.assign(identity=["Cat99", labels["identity"].iloc[1]]).to_csv(table, index=False)
    relabelled = add_images(store, engine.embedder, engine.local, sources_from_csv(table, SNOW / "images"))
    assert relabelled.already_there == 1 and len(relabelled.failed) == 1 and "image 1 of Leo, but the CSV says Cat99" in relabelled.failed[0][1]


def test_identify_after_the_catalogues_photos_were_archived_elsewhere(tmp_path, tiny_checkpoint, fusion_file, gallery_and_queries):
    """A team moves last season's photos to an archive: their keypoints are cached by content, so identify
    still re-scores its shortlist with them instead of failing on the first photo it cannot find."""
    import shutil

    from spotmatch.catalogue.service import add_images, identify, init_catalogue, open_engine, sources_from_csv

    labels = pd.read_csv(gallery_and_queries[0], dtype=str, keep_default_na=False).groupby("identity").head(3)
    photos = tmp_path / "season1"
    photos.mkdir()
    for name in labels["filename"]:  # copies, not links: a link would be followed to the data set, which stays put
        shutil.copyfile(SNOW / "images" / name, photos / name)
    labels.to_csv(photos / "labels.csv", index=False)
    store = init_catalogue(tmp_path / "cat", tiny_checkpoint, fusion_file)
    engine = open_engine(store, shortlist_k=5)
    assert add_images(store, engine.embedder, engine.local, sources_from_csv(photos / "labels.csv", photos)).added == len(labels)
    photos.rename(tmp_path / "archive")
    result = identify(store, open_engine(store, shortlist_k=5), [gallery_and_queries[1][0]])[0]
    assert result.candidates and all(c.inliers is not None for c in result.candidates)


def test_relink_points_a_moved_catalogue_at_its_files_and_refuses_other_ones(tmp_path, tiny_checkpoint, fusion_file,
                                                                            gallery_and_queries):
    """A team moves its model and its photos (another disk): `relink` takes the same files at their new
    places, refuses another model, and the catalogue identifies with drawings again."""
    import shutil

    import torch

    from spotmatch.catalogue.service import IdentifyConfig, add_images, identify, init_catalogue, open_engine, sources_from_csv
    from spotmatch.catalogue.store import Catalogue

    labels = pd.read_csv(gallery_and_queries[0], dtype=str, keep_default_na=False).groupby("identity").head(2)
    models, photos = tmp_path / "models", tmp_path / "photos"
    models.mkdir()
    photos.mkdir()
    shutil.copyfile(tiny_checkpoint, models / "best.pt")
    shutil.copyfile(fusion_file, models / "fusion.json")
    for name in labels["filename"]:
        shutil.copyfile(SNOW / "images" / name, photos / name)
    labels.to_csv(photos / "labels.csv", index=False)
    store = init_catalogue(tmp_path / "cat", models / "best.pt", models / "fusion.json")
    add_images(store, *(lambda engine: (engine.embedder, engine.local))(open_engine(store, shortlist_k=5)),
               sources_from_csv(photos / "labels.csv", photos))
    store.close()
    models.rename(tmp_path / "models2")
    photos.rename(tmp_path / "archive")
    folder = tmp_path / "cat"
    other = tmp_path / "other.pt"
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["model"] = {name: weight + 0.01 if weight.is_floating_point() else weight for name, weight in payload["model"].items()}
    torch.save(payload, other)
    refused = run_cli("catalogue", "relink", folder, "--checkpoint", other)
    assert refused.returncode == 2 and "other.pt: another model than the catalogue's" in refused.stderr, refused.stderr
    relinked = run_cli("catalogue", "relink", folder, "--checkpoint", tmp_path / "models2" / "best.pt", "--fusion",
                       tmp_path / "models2" / "fusion.json", "--photos", f"{photos}={tmp_path / 'archive'}")
    assert relinked.returncode == 0 and f"{len(labels)} photo paths now under {tmp_path / 'archive'}" in relinked.stdout, relinked.stderr
    store = Catalogue.open(folder)
    assert all(Path(path).is_file() for path in store.images_table()["path"])
    result = identify(store, open_engine(store, shortlist_k=5), [gallery_and_queries[1][0]], IdentifyConfig(explain_dir=tmp_path / "why"))[0]
    assert result.candidates and result.candidates[0].explanation_png  # drawn from the photo at its new place
    assert [row[0] for row in store.db.execute("SELECT action FROM confirmations WHERE action = 'relink'")] == ["relink"] * 3


def test_a_calibration_made_again_in_place_is_refused_until_relinked(tmp_path, tiny_checkpoint, fusion_file):
    """`calibrate` writes beside the checkpoint by default: a run for another purpose (a few photos, another target
    precision) once moved the thresholds of every catalogue reading that file, unseen. It is refused now until
    `relink --fusion` takes it, a history row."""
    import shutil

    from spotmatch.catalogue.service import init_catalogue, open_engine
    from spotmatch.catalogue.store import Catalogue
    from spotmatch.errors import SpotmatchError
    from spotmatch.fusion.calibration import FusionModel

    shutil.copyfile(fusion_file, tmp_path / "fusion.json")
    init_catalogue(tmp_path / "cat", tiny_checkpoint, tmp_path / "fusion.json").close()
    remade = FusionModel.load(tmp_path / "fusion.json")
    remade.threshold = remade.new_threshold = 0.0  # as a careless run could set them: every photo named
    remade.save(tmp_path / "fusion.json")
    store = Catalogue.open(tmp_path / "cat")
    with pytest.raises(SpotmatchError, match=r"fusion.json: changed since catalogue .* took it \(calibrated again\?\); put the original"
                                             r" back, or to decide with the new file: spotmatch catalogue relink ") as refused:
        open_engine(store)
    assert "\n" not in str(refused.value)
    store.close()
    relinked = run_cli("catalogue", "relink", tmp_path / "cat", "--fusion", tmp_path / "fusion.json", "--who", "ana")
    assert relinked.returncode == 0, relinked.stderr
    store = Catalogue.open(tmp_path / "cat")
    assert open_engine(store).fusion.threshold == 0.0  # decides with the new file now
    assert store.history()["action"].tolist()[-1] == "relink"


def test_confirm_says_what_a_photo_it_adds_was_recorded_with(tmp_path, snow_subset_csv, tiny_checkpoint):
    """A photo `confirm` adds without a date (no --date, no EXIF date) is never found by a season search: it is said."""
    from spotmatch.catalogue.service import init_catalogue

    init_catalogue(tmp_path / "cat", tiny_checkpoint, None).close()
    first, second = pd.read_csv(snow_subset_csv)["filename"].head(2)
    undated = run_cli("catalogue", "confirm", tmp_path / "cat", SNOW / "images" / first, "--new", "--station", "S04", "--who", "ana")
    assert undated.returncode == 0, undated.stderr
    assert undated.stdout.splitlines()[0] == ("added as image 1: S04, no capture date (no --date, no EXIF date): --since/--until"
                                              " searches leave it out, flank unknown")
    dated = run_cli("catalogue", "confirm", tmp_path / "cat", SNOW / "images" / second, "--new", "--date", "2012-07-22", "--side", "left")
    assert dated.stdout.splitlines()[0] == "added as image 2: station unknown, 2012-07-22, left flank", dated.stderr
    again = run_cli("catalogue", "confirm", tmp_path / "cat", SNOW / "images" / first, "--individual", "individual-0002")
    assert again.returncode == 0 and "added as" not in again.stdout  # already in: nothing added


def test_corrupt_image_is_reported_and_skipped(tmp_path, snow_subset_csv, tiny_checkpoint):
    from spotmatch.catalogue.service import add_images, init_catalogue, open_engine, sources_from_folder

    photos = small_folder(tmp_path, snow_subset_csv, 2)
    good = next(photos.iterdir()).resolve().read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (photos / "not_an_image.png").write_bytes(b"hello")
    store = init_catalogue(tmp_path / "cat", tiny_checkpoint, None)
    engine = open_engine(store)
    report = add_images(store, engine.embedder, engine.local, sources_from_folder(photos))
    assert report.added == 2 and sorted(Path(p).name for p, _ in report.failed) == ["not_an_image.png", "truncated.jpg"]
    assert all("cannot decode image" in reason for _, reason in report.failed)
    assert store.stats()["images"] == 2 and store.integrity_problems() == []


def test_migrations_upgrade_an_older_catalogue(tmp_path):
    from spotmatch.catalogue.migrations import MIGRATIONS, SCHEMA_VERSION, schema_version
    from spotmatch.catalogue.store import Catalogue, connect

    db = connect(tmp_path / "catalogue.db")
    MIGRATIONS[0](db)  # a catalogue written by the first schema version
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO meta VALUES ('checkpoint', 'x'), ('embedder_id', 'm'), ('embedding_dim', '4')")
    for n, written in enumerate(("2012:07:22 01:53:20", "2012-7-22 1-53-20", "at dawn")):  # EXIF, a CSV's, free text
        db.execute("INSERT INTO images(path, filename, sha256, captured_at, added_at, embedder_id, embedding)"
                   " VALUES ('p', 'f', ?, ?, 'now', 'm', x'00000000')", (str(n), written))
    db.execute("INSERT INTO individuals(id, name, created_at) VALUES (7, 'Cat7', 'now')")
    db.execute("INSERT INTO confirmations(action, image_id, individual_id, who, at) VALUES ('confirm', 1, 7, 'ana', 'now'),"
               " ('merge', 2, NULL, 'ben', 'now')")
    db.close()
    store = Catalogue.open(tmp_path)
    assert schema_version(store.db) == SCHEMA_VERSION == 5
    named = store.db.execute("SELECT individual_id, individual_name FROM confirmations ORDER BY id").fetchall()
    assert [tuple(r) for r in named] == [(7, "Cat7"), (None, None)]  # history rows name their individual from now on
    assert store.db.execute("SELECT name FROM sqlite_master WHERE name = 'images_by_individual'").fetchone()
    captured = [r[0] for r in store.db.execute("SELECT captured_at FROM images ORDER BY id")]
    assert captured == ["2012-07-22T01:53:20", "2012-07-22T01:53:20", "at dawn"]  # read as ISO, or kept as written
    assert store.db.execute("SELECT side FROM images").fetchall() and store.stats()["retired_individuals"] == 0


def _image_count(db_path: Path) -> int:
    try:
        with sqlite3.connect(db_path, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_killed_add_leaves_a_consistent_catalogue_and_rerun_completes(tmp_path, snow_subset_csv, tiny_checkpoint):
    from spotmatch.catalogue.store import Catalogue

    from spotmatch.catalogue.service import add_images, init_catalogue, open_engine, sources_from_folder

    photos = small_folder(tmp_path, snow_subset_csv, 12)
    folder = tmp_path / "cat"
    init_catalogue(folder, tiny_checkpoint, None).close()
    process = subprocess.Popen([*CLI, "catalogue", "add", str(folder), str(photos), "--batch-size", "2"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _image_count(folder / "catalogue.db") < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = _image_count(folder / "catalogue.db")
    assert 2 <= interrupted < 12, "the add was not caught mid-way"
    store = Catalogue.open(folder)
    assert store.integrity_problems() == []  # integrity_check, every image row with a whole embedding, FKs
    engine = open_engine(store)
    rerun = add_images(store, engine.embedder, engine.local, sources_from_folder(photos))
    assert (rerun.added, rerun.already_there, rerun.failed) == (12 - interrupted, interrupted, [])
    again = add_images(store, engine.embedder, engine.local, sources_from_folder(photos))
    assert (again.added, again.already_there) == (0, 12) and store.integrity_problems() == []


WRITER = """
import sys
from pathlib import Path
import numpy as np
from spotmatch.catalogue.service import AddConfig, add_images, sources_from_folder
from spotmatch.catalogue.store import Catalogue

class HashEmbedder:  # a stand-in model: the store's locking is under test here, not the network
    def __init__(self, model_id, dim):
        self.model_id, self.dim = model_id, dim
    def embed(self, paths):
        vectors = np.stack([np.random.default_rng(abs(hash(Path(p).name)) % 2**32).normal(size=self.dim) for p in paths])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

store = Catalogue.open(sys.argv[1])
settings = store.settings()
report = add_images(store, HashEmbedder(settings.embedder_id, settings.embedding_dim), None,
                    sources_from_folder(Path(sys.argv[2])), AddConfig(batch_size=1, who=sys.argv[3]))
print(report.added, report.already_there, len(report.failed))
"""


def test_two_processes_adding_at_once(tmp_path, snow_subset_csv):
    """Two writer processes on the same folder: each image lands once, nothing is corrupted, nobody gets 'locked'."""
    from spotmatch.catalogue.store import Catalogue, CatalogueSettings

    photos = small_folder(tmp_path, snow_subset_csv, 16)
    folder = tmp_path / "cat"
    Catalogue.create(folder, CatalogueSettings(checkpoint="none", fusion=None, embedder_id="stand-in", embedding_dim=64)).close()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(photos), f"writer{n}"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    outputs = [w.communicate(timeout=120) for w in writers]
    assert all(w.returncode == 0 for w in writers), outputs
    counts = [list(map(int, out.split())) for out, _ in outputs]
    assert sum(c[0] for c in counts) == 16 and all(c[0] + c[1] == 16 and c[2] == 0 for c in counts)
    store = Catalogue.open(folder)
    assert store.stats()["images"] == 16 and store.integrity_problems() == []
    assert store.db.execute("SELECT COUNT(DISTINCT sha256) FROM images").fetchone()[0] == 16


def test_a_damaged_database_is_one_line_not_a_traceback(tmp_path):
    from spotmatch.catalogue.store import DB_NAME, Catalogue
    from spotmatch.errors import SpotmatchError

    (tmp_path / DB_NAME).write_bytes(b"not a database " * 200)
    with pytest.raises(SpotmatchError, match=f"{DB_NAME}: not a readable catalogue database .*restore it from a backup"):
        Catalogue.open(tmp_path)

    # Damage past the pages opening reads: SQLite meets it only where a command reads. `stats` checks every page,
    # and a command that meets it says so in one line.
    stand_in_catalogue(tmp_path / "cat", {f"Cat{i}": 30 for i in range(20)}).close()
    with open(tmp_path / "cat" / DB_NAME, "r+b") as db:
        db.seek(5 * 4096)
        db.write(np.random.default_rng(0).bytes(30 * 4096))
    stats = run_cli("catalogue", "stats", tmp_path / "cat")
    assert stats.returncode == 2 and stats.stderr.count("\n") == 1 and f"{DB_NAME}: damaged (" in stats.stderr, stats.stderr
    export = run_cli("catalogue", "export", tmp_path / "cat", "--out", tmp_path / "all.csv")
    assert export.returncode == 2 and export.stderr.count("\n") == 1 and "database is damaged" in export.stderr, export.stderr
    assert not (tmp_path / "all.csv").exists()
    backup = run_cli("catalogue", "backup", tmp_path / "cat", "--out", tmp_path / "backup")  # never a good-looking copy
    assert backup.returncode == 2 and backup.stderr.count("\n") == 1 and "damaged" in backup.stderr, backup.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat", DB_NAME]


def stand_in_catalogue(folder: Path, images_per_individual: dict[str, int]):
    """A catalogue of made-up embeddings, no model: for the store's own rules, in milliseconds."""
    from spotmatch.catalogue.store import Catalogue, CatalogueSettings, NewImage

    store = Catalogue.create(folder, CatalogueSettings(checkpoint="none", fusion=None, embedder_id="stand-in", embedding_dim=4))
    rng = np.random.default_rng(0)
    store.insert_images([NewImage(path=f"{name}-{n}.jpg", sha256=f"{name}-{n}", embedding=rng.normal(size=4).astype(np.float32),
                                  embedder_id="stand-in", identity=name)
                         for name, count in images_per_individual.items() for n in range(count)], who="ana")
    return store


def _snapshot(store) -> dict[str, list[tuple]]:
    return {table: [tuple(r) for r in store.db.execute(f"SELECT * FROM {table} ORDER BY id")]
            for table in ("individuals", "images", "confirmations")}


HISTORY = "SELECT id, action, image_id, individual_id, individual_name, detail, who FROM confirmations ORDER BY id"


def test_an_add_that_loses_a_race_to_another_label_reports_it_and_makes_no_empty_individual(tmp_path):
    """Two adds at once: the other process stored these photos first, under other labels. The loser reports
    each as a relabelling (exit 1), not as "already there", and no individual is made for its labels."""
    from spotmatch.catalogue.service import AddReport, ImageSource, insert_fresh
    from spotmatch.catalogue.store import NewImage

    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 1})
    store.insert_images([NewImage(path=f"p{i}.jpg", sha256=f"sha{i}", embedding=np.ones(4, np.float32), embedder_id="stand-in",
                                  identity="Cat2") for i in range(2)], who="bo")
    fresh = [(ImageSource(path=Path(f"p{i}.jpg"), identity=label), f"sha{i}", None) for i, label in enumerate(["WrongCat", "Cat2"])]
    report = AddReport()
    insert_fresh(store, fresh, np.ones((2, 4), np.float32), "stand-in", None, "ana", report)
    assert (report.added, report.already_there, len(report.failed)) == (0, 1, 1)
    assert "of Cat2, but the CSV says WrongCat" in report.failed[0][1]
    assert "WrongCat" not in store.individual_names().values()


def test_merge_keeps_each_history_row_about_its_individual_and_never_mixes_retired_with_living(tmp_path):
    from spotmatch.errors import SpotmatchError

    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 2, "Cat2": 3, "Cat3": 3})
    store.retire("Cat3", who="ana")
    before = _snapshot(store)
    for keep, absorb in (("Cat2", "Cat3"), ("Cat3", "Cat2")):  # Cat3 proposed again, or Cat2 hidden: both refused
        with pytest.raises(SpotmatchError, match=r"'Cat3' is retired and 'Cat2' is not; run `spotmatch catalogue retire \S+ Cat3"
                                                 r" --undo` first") as refused:
            store.merge(keep, absorb, who="ben")
        assert "\n" not in str(refused.value)
    assert _snapshot(store) == before

    store.retire("Cat3", who="ana", undo=True)
    cat2, cat3 = store.individual_id("Cat2"), store.individual_id("Cat3")
    history = [tuple(r) for r in store.db.execute(HISTORY)]
    moved = [r[0] for r in store.db.execute("SELECT id FROM images WHERE individual_id = ? ORDER BY id", (cat3,))]
    assert store.merge("Cat2", "Cat3", who="ben") == 3
    after = [tuple(r) for r in store.db.execute(HISTORY)]
    # Every earlier row says what it said about whom it said it; only the merged-away individual's id is gone.
    assert after[:len(history)] == [(*row[:3], None if row[3] == cat3 else row[3], *row[4:]) for row in history]
    assert after[len(history):] == [(row_id, "merge", image, cat2, "Cat2", "merged Cat3 into Cat2", "ben")
                                    for row_id, image in zip(range(history[-1][0] + 1, history[-1][0] + 4), moved)]
    about = lambda name: [r[0] for r in store.db.execute("SELECT action FROM confirmations WHERE individual_name = ? ORDER BY id",  # noqa: E731
                                                         (name,))]
    assert about("Cat3") == ["import"] * 3 + ["retire", "unretire"] and "retire" not in about("Cat2")

    store.retire("Cat1", who="ana")
    store.retire("Cat2", who="ana")
    assert store.merge("Cat1", "Cat2", who="ben") == 6  # both retired: nothing changes for identify
    stats = store.stats()
    assert (stats["individuals"], stats["retired_individuals"], stats["identified_images"]) == (1, 1, 8)
    assert store.integrity_problems() == []


def test_review_commands_refuse_what_would_record_something_untrue(tmp_path):
    from spotmatch.catalogue.service import AddConfig, init_catalogue
    from spotmatch.errors import SpotmatchError

    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 3, "Cat2": 1})
    ids = [r[0] for r in store.db.execute("SELECT id FROM images WHERE individual_id = ? ORDER BY id", (store.individual_id("Cat1"),))]
    store.retire("Cat2", who="ana")
    before = _snapshot(store)
    refusals = [
        (lambda: store.split("Cat1", [ids[1], ids[1]], None, who="ana"), rf"image id\(s\) \[{ids[1]}\] listed more than once"),
        (lambda: store.split("Cat1", ids, None, who="ana"), "all the images of 'Cat1'; to give it another name use `spotmatch catalogue rename`"),
        (lambda: store.retire("Cat2", who="ana"), "'Cat2' is already retired; nothing to do"),
        (lambda: store.retire("Cat1", who="ana", undo=True), "'Cat1' is not retired; nothing to undo"),
        (lambda: store.confirm(ids[0], "Cat2", who=""), "--who '' is blank; give the name"),
        (lambda: store.confirm(ids[0], "cat2", who="ana"), "no individual named 'cat2'; did you mean 'Cat2'"),  # a typo, not a new animal
        (lambda: store.confirm(ids[0], "Cat 1", who="ana"), "no individual named 'Cat 1'; did you mean 'Cat1'"),
        (lambda: store.merge("Cat2", "Cat1", who=" "), "--who ' ' is blank"),
        (lambda: store.split("Cat1", ids[:1], None, who=""), "--who '' is blank"),
        (lambda: store.rename("Cat1", "Cat9", who=""), "--who '' is blank"),
        (lambda: store.retire("Cat2", who="", undo=True), "--who '' is blank"),
        (lambda: AddConfig(who="\t"), "--who '\\\\t' is blank"),  # add, and confirm of a new photo, before it is added
        (lambda: init_catalogue(tmp_path / "c3", tmp_path / "best.pt", None, extractor="foo"),
         "--extractor 'foo': unknown local features; choose one of rootsift, .*, loftr"),
    ]
    for call, message in refusals:
        with pytest.raises(SpotmatchError, match=message) as refused:
            call()
        assert "\n" not in str(refused.value)
    assert _snapshot(store) == before and not (tmp_path / "c3").exists()
    assert store.split("Cat1", ids[1:], "Cat1b", who="ana") == "Cat1b"
    assert [tuple(r) for r in store.db.execute("SELECT image_id, individual_name FROM confirmations WHERE action = 'split'")] == \
        [(ids[1], "Cat1b"), (ids[2], "Cat1b")]


def test_confirm_refuses_a_number_that_is_also_a_file_here(tmp_path, monkeypatch, snow_subset_csv):
    from spotmatch.cli.catalogue_cmds import confirm_target
    from spotmatch.errors import SpotmatchError

    monkeypatch.chdir(tmp_path)
    assert confirm_target("7", None) == 7
    (tmp_path / "7").symlink_to(SNOW / "images" / pd.read_csv(snow_subset_csv)["filename"].iloc[0])
    with pytest.raises(SpotmatchError, match=r"^7: both a file here and a catalogue image id; write \./7 for the file, or --image-id 7"):
        confirm_target("7", None)
    assert confirm_target("./7", None) == Path("7") and confirm_target(None, 7) == 7
    with pytest.raises(SpotmatchError, match="^confirm: 7 and --image-id 7; name either .* not both or neither"):
        confirm_target("7", 7)
    with pytest.raises(SpotmatchError, match="^confirm: no photo; name either"):
        confirm_target(None, None)


def test_a_catalogue_this_user_cannot_write_is_read_and_a_write_is_one_line(tmp_path, monkeypatch):
    from spotmatch.catalogue.service import export_table
    from spotmatch.catalogue.store import Catalogue
    from spotmatch.errors import SpotmatchError

    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 2, "Cat2": 2})
    before = _snapshot(store)
    store.close()
    monkeypatch.setattr(os, "access", lambda path, mode, **_: mode != os.W_OK)  # as for a user without write permission
    read_only = Catalogue.open(tmp_path / "cat")
    assert not read_only.writable and read_only.stats()["images"] == 4 and len(export_table(read_only, competition=False)) == 4
    assert len(read_only.search_index()[1]) == 4 and not read_only.index_path.exists()  # searched, the cache not written
    for write in (lambda: read_only.merge("Cat1", "Cat2", who="ana"), lambda: read_only.retire("Cat1", who="ana")):
        with pytest.raises(SpotmatchError, match=r"catalogue.db: the catalogue cannot be written by this user \(permissions:"
                                                 r" attempt to write a readonly database\); run the command as a user who can write"):
            write()
    assert _snapshot(read_only) == before
    read_only.close()
    monkeypatch.undo()
    with sqlite3.connect(tmp_path / "cat" / "catalogue.db") as db:  # as if made by an older version
        db.execute("PRAGMA user_version = 4")
    monkeypatch.setattr(os, "access", lambda path, mode, **_: mode != os.W_OK)
    with pytest.raises(SpotmatchError, match=r"made by an older spotmatch \(schema version 4, now 5\); open it once as a user who can write"):
        Catalogue.open(tmp_path / "cat")


@pytest.fixture
def folder_every_user_reaches():
    """A folder under /tmp that other users can enter, unlike pytest's own (0700 below the root's)."""
    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp(dir="/tmp"))
    shared.chmod(0o777)
    yield shared
    shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="plays two users: needs root to switch uid")
def test_the_owner_is_told_whose_sqlite_files_block_a_write(folder_every_user_reaches):
    """A teammate without write access reads the catalogue: SQLite makes its -wal and -shm files as that user,
    with the database's mode. The owner's next write fails on them; the error names them and their owner,
    not "this user cannot write the catalogue", and what it says to do works."""
    folder = folder_every_user_reaches / "cat"

    def as_user(uid: int, body: str) -> subprocess.CompletedProcess:
        script = ("import os, sys\nsys.path.insert(0, 'tests')\nfrom pathlib import Path\nfrom test_catalogue import stand_in_catalogue\n"
                  "from spotmatch.catalogue.store import Catalogue\nfrom spotmatch.errors import SpotmatchError\n"
                  f"os.setgid({uid}); os.setuid({uid})\nfolder = Path({str(folder)!r})\n{body}")  # imports first: root's Python
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)

    owner, teammate = 1000, 65534
    made = as_user(owner, "stand_in_catalogue(folder, {'Cat1': 2}).close()\nfolder.chmod(0o777)\n")
    assert made.returncode == 0, made.stderr
    read = as_user(teammate, "store = Catalogue.open(folder)\nprint(store.writable, store.stats()['images'])\n")
    assert read.stdout.split() == ["False", "2"], read.stderr
    rename = "try:\n    Catalogue.open(folder).rename('Cat1', 'Leo', who='ana')\n    print('renamed')\nexcept SpotmatchError as e:\n    print(e)\n"
    refused = as_user(owner, rename).stdout
    assert re.search(r"catalogue.db-(wal|shm): made by \S+ .* cannot write it; ask .* to make catalogue.db-wal and catalogue.db-shm"
                     r" writable for this user", refused), refused
    for companion in ("catalogue.db-wal", "catalogue.db-shm"):
        (folder / companion).chmod(0o666)  # what the message asks of the teammate or root
    assert as_user(owner, rename).stdout.strip() == "renamed"


def test_add_and_stats_say_what_they_were_given(tmp_path, snow_subset_csv):
    from spotmatch.catalogue.service import sources_from_path
    from spotmatch.catalogue.store import Catalogue
    from spotmatch.errors import SpotmatchError

    photo = next(small_folder(tmp_path, snow_subset_csv, 1).iterdir())
    assert [s.path for s in sources_from_path(photo)] == [photo.resolve()]  # one photo, as identify takes them
    (tmp_path / "notes.dat").write_bytes(b"\xff\xd8\xff\xe0 neither text nor a photo")
    with pytest.raises(SpotmatchError, match=r"notes.dat: not a readable CSV \(.*\); .*; else pass a CSV of photos, a folder of photos, or one photo"):
        sources_from_path(tmp_path / "notes.dat")
    with pytest.raises(SpotmatchError, match=r"labels.csv: a file, not a catalogue folder; name the folder that holds catalogue.db"):
        Catalogue.open(snow_subset_csv)


def test_an_init_interrupted_before_its_settings_leaves_no_catalogue_and_runs_again(tmp_path, monkeypatch):
    """The database is renamed into place once its settings are in: killed before that, init simply runs again."""
    from spotmatch.catalogue.store import DB_NAME, Catalogue, CatalogueSettings
    from spotmatch.errors import SpotmatchError

    settings = CatalogueSettings(checkpoint="none", fusion=None, embedder_id="stand-in", embedding_dim=4)

    def killed(*_):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            Catalogue.create(tmp_path / "cat", settings)
    assert not (tmp_path / "cat" / DB_NAME).exists()
    assert Catalogue.create(tmp_path / "cat", settings).settings() == settings  # over the leftover partial file
    assert not [p.name for p in (tmp_path / "cat").iterdir() if ".part" in p.name]
    with sqlite3.connect(tmp_path / "cat" / DB_NAME) as db:  # as an init killed before 2026-12-07 left it
        db.execute("DELETE FROM meta")
    with pytest.raises(SpotmatchError, match=r"init` never finished \(no settings recorded\); delete \S+ and run init again"):
        Catalogue.open(tmp_path / "cat").settings()


def test_two_inits_at_once_make_one_catalogue_and_refuse_the_other_in_one_line(tmp_path, monkeypatch):
    """The second waits for the first (it used to delete the first's half-built file, or replace its catalogue)."""
    import contextlib
    import threading

    import spotmatch.catalogue.store as store_module
    from spotmatch.catalogue.store import DB_NAME, Catalogue, CatalogueSettings
    from spotmatch.errors import SpotmatchError

    real_connect, both_checked = store_module.connect, threading.Barrier(2)

    def connect_after_both_checked(path, *args, **kwargs):  # both passed the first "no catalogue here" check
        if path.name.endswith(".part"):
            with contextlib.suppress(threading.BrokenBarrierError):
                both_checked.wait(timeout=2)
        return real_connect(path, *args, **kwargs)

    monkeypatch.setattr(store_module, "connect", connect_after_both_checked)
    outcomes = []

    def init(name: str) -> None:
        settings = CatalogueSettings(checkpoint=name, fusion=None, embedder_id="stand-in", embedding_dim=4)
        try:
            Catalogue.create(tmp_path / "cat", settings).close()
            outcomes.append(("made", name))
        except SpotmatchError as error:
            outcomes.append(("refused", str(error)))

    threads = [threading.Thread(target=init, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(kind for kind, _ in outcomes) == ["made", "refused"]
    made = next(name for kind, name in outcomes if kind == "made")
    assert "a catalogue already exists here" in next(text for kind, text in outcomes if kind == "refused")
    monkeypatch.setattr(store_module, "connect", real_connect)
    assert Catalogue.open(tmp_path / "cat").settings().checkpoint == made
    assert not [p.name for p in (tmp_path / "cat").iterdir() if p.name.startswith(DB_NAME + ".part")]


def test_relink_rewrites_only_the_photos_found_moved_with_the_same_content(tmp_path):
    """Half the photos moved, and a different photo of a moved one's name waits at the new place: only the
    moved ones are relinked; the others keep paths that still lead to them."""
    import hashlib

    from spotmatch.catalogue.store import Catalogue, CatalogueSettings, NewImage

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    store = Catalogue.create(tmp_path / "cat", CatalogueSettings(checkpoint="none", fusion=None, embedder_id="stand-in", embedding_dim=4))
    for n in range(4):
        (old / f"p{n}.jpg").write_bytes(f"photo {n}".encode())
    store.insert_images([NewImage(path=str(old / f"p{n}.jpg"), sha256=hashlib.sha256(f"photo {n}".encode()).hexdigest(),
                                  embedding=np.ones(4, np.float32), embedder_id="stand-in", identity="Cat1") for n in range(4)], who="ana")
    for n in (0, 1):
        (old / f"p{n}.jpg").rename(new / f"p{n}.jpg")
    (new / "p2.jpg").write_bytes(b"another photo of that name")
    moved = store.moved_photos(old, new)
    store.relink_photos(moved, who="ana")
    assert (len(moved.found), moved.stored) == (2, 4)
    paths = store.images_table()["path"].tolist()
    assert paths == [str(new / "p0.jpg"), str(new / "p1.jpg"), str(old / "p2.jpg"), str(old / "p3.jpg")]
    assert all(Path(path).read_bytes() == f"photo {n}".encode() for n, path in enumerate(paths))
    relinked = run_cli("catalogue", "relink", tmp_path / "cat", "--photos", f"{new}={old}")  # nothing of these is under old
    assert relinked.returncode == 2 and "is here with the same content" in relinked.stderr, relinked.stderr


def test_near_namesakes_are_refused_wherever_a_name_is_given(tmp_path):
    """"cat 1" beside Cat1 is a typo far more often than a new animal: refused by rename, split and add as by
    confirm, while a rename of Cat1 to cat1 (its own name) is allowed."""
    from spotmatch.catalogue.service import ImageSource, refuse_misleading_labels
    from spotmatch.errors import SpotmatchError

    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 2, "Cat2": 2})
    cat2_images = [r[0] for r in store.db.execute("SELECT id FROM images WHERE individual_id = ?", (store.individual_id("Cat2"),))]
    before = _snapshot(store)
    refusals = [
        (lambda: store.rename("Cat2", "cat 1", who="ana"), "'cat 1' is too like the existing 'Cat1'"),
        (lambda: store.split("Cat2", cat2_images[:1], "CAT-1", who="ana"), "'CAT-1' is too like the existing 'Cat1'"),
        (lambda: refuse_misleading_labels(store, [ImageSource(Path("a.jpg"), "Cat9"), ImageSource(Path("b.jpg"), "cat1")]),
         r"b.jpg: labelled 'cat1', too like the catalogue's 'Cat1'"),
        (lambda: refuse_misleading_labels(store, [ImageSource(Path("a.jpg"), "Cat9"), ImageSource(Path("b.jpg"), "cat 9")]),
         r"b.jpg: labelled 'cat 9', and a.jpg 'Cat9' \(only case"),
    ]
    for call, message in refusals:
        with pytest.raises(SpotmatchError, match=message) as refused:
            call()
        assert "\n" not in str(refused.value)
    assert _snapshot(store) == before
    refuse_misleading_labels(store, [ImageSource(Path("a.jpg"), "Cat1"), ImageSource(Path("b.jpg"), "Cat3"), ImageSource(Path("c.jpg"))])
    store.rename("Cat1", "cat1", who="ana")
    assert sorted(store.individual_names().values()) == ["Cat2", "cat1"]


def test_a_name_given_up_by_a_rename_or_merge_is_not_taken_for_a_new_animal(tmp_path):
    """A table written before `rename Cat1 Luna`, added again, or a reviewer reading an old list, would otherwise
    make a second animal called Cat1 without a word. A name whose individual is gone (its last photo confirmed as
    another animal) is free again."""
    from spotmatch.catalogue.service import ImageSource, refuse_misleading_labels
    from spotmatch.errors import SpotmatchError

    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 2, "Cat2": 2, "Cat3": 1, "Cat4": 1})
    store.rename("Cat1", "Luna", who="ana")
    store.merge("Luna", "Cat2", who="ana")
    cat3_image = store.db.execute("SELECT id FROM images WHERE individual_id = ?", (store.individual_id("Cat3"),)).fetchone()[0]
    store.confirm(cat3_image, "Luna", who="ana")  # Cat3 had one photo: gone, not renamed
    new_photo = SNOW / "images" / pd.read_csv(SNOW / "labels.csv")["filename"].iloc[0]  # not in this catalogue yet
    before = _snapshot(store)
    for call, message in [
        (lambda: store.confirmable_name("Cat1"), "no individual is named 'Cat1' now: 'Cat1' was renamed to 'Luna'"),
        (lambda: store.confirmable_name("cat 1"), "no individual is named 'cat 1' now: 'Cat1' was renamed to 'Luna'"),
        (lambda: store.confirm(1, "Cat2", who="ana"), "'Cat2' was merged into 'Luna'"),
        (lambda: store.split("Luna", [1], "Cat1", who="ana"), "'Cat1' was renamed to 'Luna'"),
        (lambda: store.rename("Cat4", "Cat1", who="ana"), "'Cat1' was renamed to 'Luna'"),  # another animal's old name
        (lambda: refuse_misleading_labels(store, [ImageSource(new_photo, "Cat2")]),
         f"{new_photo.name}: labelled 'Cat2', but 'Cat2' was merged into 'Luna'; relabel"),
    ]:
        with pytest.raises(SpotmatchError, match=message) as refused:
            call()
        assert "\n" not in str(refused.value)
    assert _snapshot(store) == before
    assert store.former_name("Cat3") is None and store.former_name("Luna") is None
    store.confirm(cat3_image, "Cat3", who="ana")
    assert "Cat3" in store.individual_names().values()
    store.rename("Luna", "Cat1", who="ana")  # a rename undone: its own former name
    assert "Cat1" in store.individual_names().values()


def test_a_fresh_name_is_never_one_given_up(tmp_path):
    """SQLite gives a merged-away individual's id to the next one: `confirm --new` named it after the merged animal,
    then refused its own choice."""
    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 2, "Cat2": 2})
    image = store.db.execute("SELECT id FROM images WHERE individual_id = ?", (store.individual_id("Cat2"),)).fetchone()[0]
    first = store.confirm(image, None, who="ana").individual  # the newest individual, the highest id
    store.merge("Cat1", first, who="ana")  # frees that id
    second = store.confirm(image, None, who="ana").individual
    assert (first, second) == ("individual-0003", "individual-0004")

def test_confirming_an_individuals_last_image_elsewhere_removes_it_and_says_so(tmp_path):
    """Otherwise an individual without images would stay counted and listed, which split refuses to make."""
    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 1, "Cat2": 2})
    (only,) = [r[0] for r in store.db.execute("SELECT id FROM images WHERE individual_id = ?", (store.individual_id("Cat1"),))]
    confirmed = store.confirm(only, "Cat2", who="ana")
    assert (confirmed.previous, confirmed.previous_removed) == ("Cat1", True)
    assert "was Cat1, which had no other image and is removed" in confirmed.text("ana")
    assert sorted(store.individual_names().values()) == ["Cat2"] and store.integrity_problems() == []
    assert [tuple(r) for r in store.db.execute("SELECT action, individual_name, detail FROM confirmations WHERE image_id = ? ORDER BY id",
                                               (only,))] == [("import", "Cat1", "identity from the added table"), ("confirm", "Cat2", "was Cat1")]
    again = store.confirm(only, "Cat2", who="ana")
    assert (again.previous, again.previous_removed) == ("Cat2", False) and "unchanged" in again.text("ana")


def test_add_reports_one_photo_under_two_names_with_two_labels(tmp_path, snow_subset_csv):
    """In one batch as across batches: the second label is reported, not silently dropped."""
    import shutil

    from spotmatch.catalogue.service import AddReport, ImageSource, fresh_sources

    photo = SNOW / "images" / pd.read_csv(snow_subset_csv)["filename"].iloc[0]
    shutil.copyfile(photo, tmp_path / "a.jpg")
    shutil.copyfile(photo, tmp_path / "a_copy.jpg")
    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 1})
    report = AddReport()
    fresh = fresh_sources(store, [ImageSource(tmp_path / "a.jpg", "CatX"), ImageSource(tmp_path / "a_copy.jpg", "CatY"),
                                  ImageSource(tmp_path / "a_copy.jpg", "CatX")], report)
    assert [source.identity for source, _, _ in fresh] == ["CatX"] and report.already_there == 1
    assert [path for path, _ in report.failed] == [str(tmp_path / "a_copy.jpg")]
    assert "the same photo as" in report.failed[0][1] and "labels CatX and this row CatY" in report.failed[0][1]


def test_an_export_adds_back_whole_and_the_competition_export_refuses_shared_names(tmp_path):
    """An export names each photo by its full path and date: added back without --images, photos from several
    folders are found and keep their capture times. The competition's one folder cannot hold two photos of one name."""
    from spotmatch.catalogue.service import export_table, sources_from_csv
    from spotmatch.catalogue.store import Catalogue, CatalogueSettings, NewImage
    from spotmatch.errors import SpotmatchError

    store = Catalogue.create(tmp_path / "cat", CatalogueSettings(checkpoint="none", fusion=None, embedder_id="stand-in", embedding_dim=4))
    store.insert_images([NewImage(path=str(tmp_path / folder / "IMG_0001.JPG"), sha256=folder, embedding=np.ones(4, np.float32),
                                  embedder_id="stand-in", identity=name, captured_at="2019:05:04 21:30:00")
                         for folder, name in (("uploads", "Cat5"), ("dataset", "Cat21"))], who="ana")
    export_table(store, competition=False).to_csv(tmp_path / "export.csv", index=False)
    sources = sources_from_csv(tmp_path / "export.csv")
    assert [(s.path, s.identity, s.captured_at) for s in sources] == \
        [(tmp_path / folder / "IMG_0001.JPG", name, "2019-05-04T21:30:00") for folder, name in (("uploads", "Cat5"), ("dataset", "Cat21"))]
    with pytest.raises(SpotmatchError, match="IMG_0001.JPG is labelled as different individuals"):  # --images: by file name
        sources_from_csv(tmp_path / "export.csv", tmp_path / "elsewhere")
    # Another table's relative `path` column is no export's: the photo is named by its filename, as before.
    pd.DataFrame({"filename": ["a.jpg"], "path": ["images/a.jpg"]}).to_csv(tmp_path / "own.csv", index=False)
    assert sources_from_csv(tmp_path / "own.csv")[0].path == tmp_path / "a.jpg"
    with pytest.raises(SpotmatchError, match=r"1 file name\(s\) belong to more than one photo \(e.g. IMG_0001.JPG: "):
        export_table(store, competition=True)


def test_identify_reads_a_flank_as_a_csv_does():
    from spotmatch.catalogue.store import GalleryRestriction

    assert [GalleryRestriction.from_text(side=word).side for word in ("L", "right", "", "unknown")] == ["left", "right", None, None]


def test_another_sqlite_file_or_a_newer_catalogue_is_left_as_it_is(tmp_path, tiny_checkpoint):
    import hashlib
    import shutil
    import sqlite3

    from spotmatch.catalogue.service import init_catalogue
    from spotmatch.catalogue.store import Catalogue
    from spotmatch.errors import SpotmatchError

    (tmp_path / "birds").mkdir()
    with sqlite3.connect(tmp_path / "birds" / "catalogue.db") as other:
        other.execute("CREATE TABLE birds (id INTEGER)")
    before = hashlib.sha256((tmp_path / "birds" / "catalogue.db").read_bytes()).hexdigest()
    with pytest.raises(SpotmatchError, match=r"catalogue.db: a SQLite database, but no spotmatch catalogue \(tables: birds\); left as it is"):
        Catalogue.open(tmp_path / "birds")
    assert hashlib.sha256((tmp_path / "birds" / "catalogue.db").read_bytes()).hexdigest() == before
    assert sorted(p.name for p in (tmp_path / "birds").iterdir()) == ["catalogue.db"]  # no -wal, no -shm

    init_catalogue(tmp_path / "cat", tiny_checkpoint, None).close()
    shutil.copytree(tmp_path / "cat", tmp_path / "future")
    with sqlite3.connect(tmp_path / "future" / "catalogue.db") as future:
        future.execute("PRAGMA user_version = 99")
    with pytest.raises(SpotmatchError, match=r"made by a newer spotmatch \(schema version 99, this one knows up to \d+\); upgrade"):
        Catalogue.open(tmp_path / "future")


def test_a_refused_name_adds_nothing_even_when_two_adds_race(tmp_path, tiny_checkpoint, snow_subset_csv):
    """`confirm PHOTO --individual cat21` beside Cat21 is refused before the photo is added; and an add that
    checked its names before another process made a near-namesake is refused by the write itself."""
    from spotmatch.catalogue.service import add_images, confirm_photo, init_catalogue, open_engine, sources_from_csv
    from spotmatch.catalogue.store import NewImage
    from spotmatch.errors import SpotmatchError

    store = init_catalogue(tmp_path / "cat", tiny_checkpoint, None)
    engine = open_engine(store)
    labelled = pd.read_csv(snow_subset_csv).head(2).assign(identity="Cat21")
    labelled.head(1).to_csv(tmp_path / "first.csv", index=False)
    add_images(store, engine.embedder, engine.local, sources_from_csv(tmp_path / "first.csv", SNOW / "images"))
    photo = SNOW / "images" / labelled["filename"].iloc[1]
    for name, refusal in (("cat21", r"no individual named 'cat21'; did you mean 'Cat21'\?"), ("   ", "individual name '   ' is empty")):
        with pytest.raises(SpotmatchError, match=refusal):
            confirm_photo(store, engine, photo, name, "ana")
        assert store.stats()["images"] == 1
    raced = NewImage(path=str(photo), sha256="0" * 64, embedding=np.zeros(store.settings().embedding_dim, np.float32),
                     embedder_id=store.settings().embedder_id, feature_key=None, identity="cat 21", station=None, camera=None,
                     captured_at=None, side=None)
    with pytest.raises(SpotmatchError, match="'cat 21' is too like the existing 'Cat21'"):
        store.insert_images([raced], "bob")
    assert store.stats()["images"] == 1 and list(store.individual_names().values()) == ["Cat21"]


class StandInEmbedder:
    """A model that sees nothing: for what `add` stores beside the embeddings."""

    model_id, dim = "stand-in", 4

    def embed(self, paths: list) -> np.ndarray:
        return np.full((len(paths), self.dim), 0.5, np.float32)


def test_a_csv_time_without_a_date_never_replaces_the_photos_exif_date(tmp_path):
    """A row with a time but no date (the date cell empty) stored the time alone, "16-13-56", in place of the photo's
    EXIF date, and the photo dropped out of every --since/--until search. The EXIF date is kept; without one, the
    text is (nothing written is lost), and a row's own date still wins over EXIF."""
    from PIL import Image

    from spotmatch.catalogue.service import add_images, sources_from_csv
    from spotmatch.catalogue.store import Catalogue, CatalogueSettings, GalleryRestriction

    small = Image.open(SNOW / "images" / "01__Station04__Camera2__2012-7-22__1-53-20_0.JPG").reduce(8)
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2012:07:22 01:53:20"  # DateTimeOriginal
    for n in range(3):  # three files of three contents: one image each
        small.rotate(90 * n).save(tmp_path / f"exif{n}.jpg", exif=exif)
    small.save(tmp_path / "plain.jpg")
    (tmp_path / "rows.csv").write_text("filename,identity,date,time\nexif0.jpg,Cat1,,16-13-56\nplain.jpg,Cat1,,16-13-56\n"
                                       "exif1.jpg,Cat2,2012-8-25,4:16 PM\nexif2.jpg,Cat2,2012-8-19,\n")
    store = Catalogue.create(tmp_path / "cat", CatalogueSettings(checkpoint="none", fusion=None, embedder_id="stand-in",
                                                                 embedding_dim=4))
    report = add_images(store, StandInEmbedder(), None, sources_from_csv(tmp_path / "rows.csv", tmp_path))
    assert (report.added, report.failed) == (4, [])
    stored = dict(store.db.execute("SELECT filename, captured_at FROM images"))
    assert stored == {"exif0.jpg": "2012-07-22T01:53:20", "plain.jpg": "16-13-56", "exif1.jpg": "2012-08-25T16:16:00",
                      "exif2.jpg": "2012-08-19"}
    july = store.restricted_image_ids(GalleryRestriction.from_text(since="2012-07-01", until="2012-07-31"))
    august = store.restricted_image_ids(GalleryRestriction.from_text(since="2012-08-01", until="2012-08-31"))
    filename = dict(store.db.execute("SELECT id, filename FROM images"))
    assert [filename[i] for i in july] == ["exif0.jpg"] and sorted(filename[i] for i in august) == ["exif1.jpg", "exif2.jpg"]


def test_a_date_read_in_part_is_still_found_by_a_date_restriction(tmp_path):
    """A 12-hour time ("2012-8-25 4:16 PM") was stored as written, and found by --since/--until only when the month
    was written with two digits; a date followed by words keeps its words, with its date as ISO."""
    from spotmatch.catalogue.store import GalleryRestriction, NewImage

    store = stand_in_catalogue(tmp_path / "cat", {})
    written = ["2012-08-19 4:13 PM", "2012-8-25 4:16 PM", "2012-8-14 dusk", "0000:00:00 00:00:00", "22/08/2012"]
    store.insert_images([NewImage(path=f"p{n}.jpg", sha256=f"p{n}", embedding=np.ones(4, np.float32), embedder_id="stand-in",
                                  identity="Cat1", captured_at=text) for n, text in enumerate(written)], who="ana")
    assert [r[0] for r in store.db.execute("SELECT captured_at FROM images ORDER BY id")] == \
        ["2012-08-19T16:13:00", "2012-08-25T16:16:00", "2012-08-14 dusk", None, "22/08/2012"]
    august = store.restricted_image_ids(GalleryRestriction.from_text(since="2012-08-01", until="2012-08-31"))
    assert len(august) == 3


def test_a_season_across_new_year_is_told_to_give_until_in_the_next_year():
    from spotmatch.catalogue.store import GalleryRestriction
    from spotmatch.errors import SpotmatchError

    with pytest.raises(SpotmatchError, match=r"^--since 2012-12-01 is after --until 2012-02-28; for a season across New Year"
                                             r" give --until in the next year \(2013-02-28\), else swap them$"):
        GalleryRestriction.from_text(since="2012-12-01", until="2012-02-28")
    with pytest.raises(SpotmatchError, match=r"in the next year \(2013-02-28\)"):  # 2013 has no 29 February
        GalleryRestriction.from_text(since="2012-12-01", until="2012-02-29")
    assert GalleryRestriction.from_text(since="2012-12-01", until="2013-02-28").describe().endswith("captured 2012-12-01 to 2013-02-28")


def test_an_exports_capture_times_add_back_as_they_were_stored(tmp_path):
    from spotmatch.catalogue.service import sources_from_csv
    from spotmatch.errors import SpotmatchError

    # An export keeps what the catalogue stored, an EXIF time it could not read included: it adds back as it was.
    (tmp_path / "export.csv").write_text("image_id,filename,sha256,individual,captured_at,added_at\n1,X.JPG,ab,Cat2,2012-7-14 dusk,"
                                         "2026-12-07T10:00:00+00:00\n")
    assert sources_from_csv(tmp_path / "export.csv")[0].captured_at == "2012-7-14 dusk"
    # ... but a user's table with a captured_at column is checked like any other.
    (tmp_path / "mine.csv").write_text("filename,identity,captured_at\nX.JPG,Cat2,22/07/2012\n")
    with pytest.raises(SpotmatchError, match=r"mine.csv line 2: date '22/07/2012' does not read as year-month-day"):
        sources_from_csv(tmp_path / "mine.csv")


def test_a_catalogue_csv_with_spaces_after_its_commas_names_its_photos(tmp_path):
    """`filename, identity` rows as spreadsheets write them: the space is no part of the name (as in load_dataset)."""
    from spotmatch.catalogue.service import sources_from_csv

    (tmp_path / "round.csv").write_text("filename, identity\n it's.jpg, Cat1\n")
    [source] = sources_from_csv(tmp_path / "round.csv")
    assert source.path == tmp_path / "it's.jpg" and source.identity == "Cat1"


def test_a_catalogue_whose_model_file_is_gone_says_how_to_relink_it(tmp_path):
    from spotmatch.catalogue.service import open_engine
    from spotmatch.errors import SpotmatchError

    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 1})  # made with a checkpoint path that holds nothing
    with pytest.raises(SpotmatchError, match=rf"none: the catalogue's checkpoint is gone; put it back, or if it moved: spotmatch"
                                             rf" catalogue relink {re.escape(str(tmp_path / 'cat'))} --checkpoint NEW_PATH"):
        open_engine(store)


def test_backup_is_a_consistent_catalogue_with_its_uploads_taken_while_in_use(tmp_path, monkeypatch):
    """A copy of catalogue.db alone misses the decisions still in its WAL file; `catalogue backup` holds every
    committed one, none in flight, the photos uploaded in the review app, and is a catalogue itself."""
    import shutil

    from spotmatch.catalogue import backup as backup_module
    from spotmatch.catalogue.backup import backup_catalogue, refuse_backup_target
    from spotmatch.catalogue.store import Catalogue, NewImage
    from spotmatch.errors import SpotmatchError

    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 2, "Cat2": 1})
    (tmp_path / "cat" / "uploads").mkdir()
    upload = tmp_path / "cat" / "uploads" / "new.jpg"
    upload.write_bytes((SNOW / "images" / pd.read_csv(SNOW / "labels.csv")["filename"].iloc[0]).read_bytes())
    store.insert_images([NewImage(path=str(upload.resolve()), sha256="uploaded", embedding=np.ones(4, np.float32),
                                  embedder_id="stand-in")], who="ana")
    store.confirm(4, "Cat2", who="ana")
    store.retire("Cat1", who="bo")
    hand_copy = tmp_path / "hand-copy.db"
    shutil.copyfile(tmp_path / "cat" / "catalogue.db", hand_copy)  # what "copy catalogue.db" gives while it is open
    with sqlite3.connect(hand_copy) as copied:
        assert copied.execute("SELECT COUNT(*) FROM confirmations").fetchone()[0] < len(_snapshot(store)["confirmations"])
    writer = sqlite3.connect(tmp_path / "cat" / "catalogue.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another command's write, in flight during the backup
    writer.execute("INSERT INTO individuals(name, created_at) VALUES ('Half', 'now')")

    target = refuse_backup_target(store.folder, tmp_path / "backups" / "monday")
    report = backup_catalogue(store, target)
    writer.execute("ROLLBACK")
    assert (report.images, report.individuals, report.uploads, report.photos_elsewhere) == (4, 2, 1, 3)
    assert sorted(p.name for p in target.iterdir()) == ["catalogue.db", "uploads"]  # one file: no -wal to forget
    restored = Catalogue.open(target)
    original, copy = _snapshot(store), _snapshot(restored)
    assert copy["individuals"] == original["individuals"] and copy["confirmations"] == original["confirmations"]
    assert [row[1] for row in copy["images"]] == [row[1] for row in original["images"][:3]] + [str(target / "uploads" / "new.jpg")]
    assert [row[2:] for row in copy["images"]] == [row[2:] for row in original["images"]]
    assert (target / "uploads" / "new.jpg").read_bytes() == upload.read_bytes()
    assert restored.stats()["retired_individuals"] == 1 and restored.integrity_problems() == []

    # A backup of the backup is how one restores elsewhere: its uploads follow it again.
    again = backup_catalogue(restored, refuse_backup_target(restored.folder, tmp_path / "restored"))
    assert _snapshot(Catalogue.open(again.folder))["images"][-1][1] == str(tmp_path / "restored" / "uploads" / "new.jpg")
    with pytest.raises(SpotmatchError, match="already exists and is not an empty folder"):
        refuse_backup_target(store.folder, target)
    with pytest.raises(SpotmatchError, match="inside the catalogue it backs up"):
        refuse_backup_target(store.folder, tmp_path / "cat" / "backup")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(backup_module.shutil, "copytree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        backup_catalogue(store, refuse_backup_target(store.folder, tmp_path / "backups" / "tuesday"))
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == ["monday"]  # nothing half-made, nothing hidden


def test_backup_from_the_command_line_says_what_it_did_not_copy(tmp_path):
    stand_in_catalogue(tmp_path / "cat", {"Cat1": 2}).close()
    result = run_cli("catalogue", "backup", tmp_path / "cat", "--out", tmp_path / "copy")
    assert result.returncode == 0, result.stderr
    assert "backed up 2 photos, 1 individuals and 2 recorded decisions" in result.stdout
    assert "2 catalogue photos lie outside the backup" in result.stdout
    refused = run_cli("catalogue", "backup", tmp_path / "cat", "--out", tmp_path / "copy")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "already exists and is not an empty folder" in refused.stderr


def test_names_that_would_rewrite_a_terminal_or_run_in_a_spreadsheet_are_not_given(tmp_path):
    """A name is printed by `identify` and exported to CSVs teams open in spreadsheets: a terminal escape or line
    break in it forges the printed lines, a leading = + @ or - runs as a formula. Refused wherever a new name is
    given, with the reviewer's name; a negative number stays a name."""
    from spotmatch.catalogue.service import ImageSource, refuse_misleading_labels
    from spotmatch.errors import SpotmatchError

    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 2, "Cat2": 2})
    cat2_images = [r[0] for r in store.db.execute("SELECT id FROM images WHERE individual_id = ?", (store.individual_id("Cat2"),))]
    new_photo = SNOW / "images" / pd.read_csv(SNOW / "labels.csv")["filename"].iloc[0]
    before = _snapshot(store)
    for call, message in [
        (lambda: store.confirm(1, "=HYPERLINK(\"http://x\")", who="ana"), "starts with '=', which a spreadsheet"),
        (lambda: store.confirm(1, "+cmd", who="ana"), "starts with '\\+'"),
        (lambda: store.rename("Cat2", "@SUM(A1)", who="ana"), "starts with '@'"),
        (lambda: store.split("Cat2", cat2_images[:1], "-x", who="ana"), "starts with '-'"),
        (lambda: store.rename("Cat2", "\x1b]0;owned\x07Cat9", who="ana"), "holds a control character"),
        (lambda: store.confirm(1, "Cat1\rCat2", who="ana"), "holds a control character"),
        (lambda: store.confirm(1, "Cat2", who="ana\x1b[2K"), "--who .* holds a control character"),
        (lambda: refuse_misleading_labels(store, [ImageSource(new_photo, "=1+1")]), f"{new_photo.name}: labelled '=1\\+1', which starts"),
    ]:
        with pytest.raises(SpotmatchError, match=message) as refused:
            call()
        assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)
    assert _snapshot(store) == before
    store.rename("Cat2", "-17", who="ana")
    assert sorted(store.individual_names().values()) == ["-17", "Cat1"]
    store.rename("-17", "Ирбис", who="ana")  # names in another script are names, not all one "near-namesake"
    store.rename("Cat1", "Барс", who="ana")
    assert sorted(store.individual_names().values()) == ["Барс", "Ирбис"]


def test_confirm_refuses_an_unsafe_new_name_before_adding_the_photo(tmp_path, tiny_checkpoint, fusion_file, gallery_and_queries):
    from spotmatch.catalogue.service import confirm_photo, init_catalogue, open_engine
    from spotmatch.errors import SpotmatchError

    store = init_catalogue(tmp_path / "cat", tiny_checkpoint, fusion_file)
    engine = open_engine(store, shortlist_k=5)
    with pytest.raises(SpotmatchError, match="starts with '=', which a spreadsheet"):
        confirm_photo(store, engine, gallery_and_queries[1][0], '=HYPERLINK("http://x")', "ana")
    assert store.stats()["images"] == 0  # a refused command writes nothing


def test_confirm_adds_a_new_photo_with_its_station_date_and_flank(tmp_path, tiny_checkpoint, fusion_file, gallery_and_queries):
    """A new animal's first photo, added by `confirm`, must be found by the station, season and flank searches
    that follow; facts for a photo already in the catalogue are refused, not dropped unseen."""
    from spotmatch.catalogue.service import PhotoFacts, confirm_photo, init_catalogue, open_engine
    from spotmatch.catalogue.store import GalleryRestriction
    from spotmatch.errors import SpotmatchError

    store = init_catalogue(tmp_path / "cat", tiny_checkpoint, fusion_file)
    engine = open_engine(store, shortlist_k=5)
    photo = gallery_and_queries[1][1]
    confirmed = confirm_photo(store, engine, photo, "Newcat", "ana", PhotoFacts(" S77 ", "3", "2012-8-10 4:16 PM", "L"))
    row = store.image(confirmed.image_id)
    assert (row["station"], row["camera"], row["captured_at"], row["side"]) == ("S77", "3", "2012-08-10T16:16:00", "left")
    kept = store.restricted_image_ids(GalleryRestriction.from_text([" S77"], "2012-08-01", "2012-08-31", "left"))
    assert list(kept) == [confirmed.image_id]
    with pytest.raises(SpotmatchError, match=f"already in the catalogue as image {confirmed.image_id}, with the station"):
        confirm_photo(store, engine, photo, "Newcat", "ana", PhotoFacts(station="S78"))
    with pytest.raises(SpotmatchError, match="--date 'July' does not read as year-month-day"):
        PhotoFacts(captured_at="July")
    with pytest.raises(SpotmatchError, match="--station '': empty; name one, or leave the option out"):
        GalleryRestriction.from_text(["S77", ""])


def test_one_station_written_two_ways_is_refused_before_anything_is_added(tmp_path):
    """"s26" beside S26 would split one site in two, and `identify --station S26` would miss half its photos; a
    catalogue that holds both from before is searched whole."""
    from spotmatch.catalogue.service import ImageSource, refuse_station_spellings
    from spotmatch.catalogue.store import GalleryRestriction
    from spotmatch.errors import SpotmatchError

    store = stand_in_catalogue(tmp_path / "cat", {"Cat1": 2})
    store.db.execute("UPDATE images SET station = 'S26'")
    for sources, message in (([ImageSource(Path("a.jpg"), station="s26")], "a.jpg: station 's26', but 'S26' is written another way"),
                             ([ImageSource(Path("a.jpg"), station="S 30"), ImageSource(Path("b.jpg"), station="S30")],
                              "b.jpg: station 'S30', but 'S 30' is written another way")):
        with pytest.raises(SpotmatchError, match=message):
            refuse_station_spellings(store, sources)
    # distinct codes stay distinct, in any script; only case and spaces make two spellings of one
    refuse_station_spellings(store, [ImageSource(Path(f"{n}.jpg"), station=station) for n, station in
                                     enumerate(["S26", "S27", "A12", "A1-2", "Поле", "Озеро", None])])
    store.db.execute("UPDATE images SET station = 's26' WHERE id = (SELECT MAX(id) FROM images)")  # both, from before
    refuse_station_spellings(store, [ImageSource(Path("a.jpg"), station="S26"), ImageSource(Path("b.jpg"), station="s26")])
    # such a catalogue's station search finds both spellings, however it is written
    every_image, _ = store.identified_images()
    for wanted in ("S26", "s26", "s 26"):
        assert list(store.restricted_image_ids(GalleryRestriction(stations=(wanted,)))) == list(every_image)
    with pytest.raises(SpotmatchError, match="no station named 'S2' in the catalogue"):
        store.restricted_image_ids(GalleryRestriction(stations=("S2",)))


def test_a_file_name_with_a_line_break_or_terminal_escape_is_printed_escaped(tmp_path):
    """A name is printed by `add`'s skipped lines and by every error: a line break in it would forge a line (a
    "fine" photo, a fake summary), an escape would rewrite the terminal."""
    import contextlib
    import io

    from spotmatch.catalogue.service import AddReport, print_failures
    from test_cli import run_cli

    missing = tmp_path / "gone\x1b]0;title\x07.jpg"
    refused = run_cli("catalogue", "init", tmp_path / "cat", "--checkpoint", missing)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "\x1b" not in refused.stderr
    assert "gone\\x1b]0;title\\x07.jpg" in refused.stderr
    forged = tmp_path / "a.jpg\nadded 9, already there 0, skipped 0\x1b[2K.jpg"
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        print_failures(AddReport(failed=[(str(forged), f"{forged}: cannot decode image")]))
    assert printed.getvalue().count("\n") == 1 and "\x1b" not in printed.getvalue()
    assert "a.jpg\\nadded 9, already there 0, skipped 0\\x1b[2K.jpg: cannot decode image" in printed.getvalue()
