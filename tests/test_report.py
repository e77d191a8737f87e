"""`spotmatch report`: a self-contained HTML page whose numbers are the project's own metrics."""
from __future__ import annotations

import dataclasses
import html
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import REPO

CLI = [sys.executable, "-c", "from spotmatch.cli import main; main()"]


@pytest.fixture(scope="module")
def built_report(tmp_path_factory, snow_subset_csv, tiny_checkpoint):
    from spotmatch.global_embed.embed import EmbedConfig
    from spotmatch.report import ReportConfig, build_report

    out = tmp_path_factory.mktemp("report") / "report.html"
    conf = ReportConfig(data=snow_subset_csv, checkpoint=tiny_checkpoint, out=out, top_k=3, max_images=12,
                        embed=EmbedConfig(num_workers=0, cache_dir=None, progress=False))
    return conf, build_report(conf)


def expected_per_identity_ap(conf) -> dict[str, float]:
    """Per-identity AP recomputed from scratch with the project's protocol and metrics."""
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.evaluation.metrics import retrieval_metrics
    from spotmatch.evaluation.protocol import build_protocol
    from spotmatch.evaluation.run import split_for
    from spotmatch.global_embed.embed import Embedder

    dataset = load_dataset(conf.data)
    split, split_by, _ = split_for(dataset, SplitConfig(), conf.checkpoint)
    protocol = build_protocol(dataset.table, split, split_by)
    embeddings = Embedder.from_checkpoint(conf.checkpoint, conf.embed).embed(dataset.paths)
    similarity = embeddings[protocol.query_rows] @ embeddings[protocol.gallery_rows].T
    identities = dataset.table["identity"].to_numpy()
    query_ids, gallery_ids = identities[protocol.query_rows], identities[protocol.gallery_rows]
    expected = {}
    for identity in set(query_ids):
        mine = query_ids == identity
        expected[identity] = retrieval_metrics(similarity[mine], query_ids[mine], gallery_ids, protocol.views["all"][mine])["map"]
    return expected


def test_report_is_self_contained_with_the_projects_metrics(built_report):
    conf, summary = built_report
    page = conf.out.read_text(encoding="utf-8")
    assert 'id="pca-plot"' in page and 'id="tsne-plot"' in page
    assert "Plotly.newPlot" in page and "<script src=" not in page  # plotly.js inlined, nothing fetched
    assert "the split stored in" in page  # evaluated on the checkpoint's own held-out split
    assert len(re.findall(r'"data:image/jpeg;base64,', page)) == summary.n_shown == 12
    assert "Showing 12 of 19 images" in page
    for name in ("training.png", "similarity_histogram.png", "similarity_heatmap.png", "neighbours.png"):
        png = conf.out.parent / "report_files" / name
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
        assert f'href="report_files/{name}"' in page
    shown = dict(re.findall(r'data-identity="([^"]+)"><td>[^<]*</td><td class="ap">([^<]+)</td>', page))
    expected = expected_per_identity_ap(conf)
    assert set(shown) == set(expected) and len(shown) == 3
    for identity, ap in expected.items():
        assert float(shown[identity]) == pytest.approx(ap, abs=1e-4)
    assert summary.ib_map == pytest.approx(np.mean(list(expected.values())))
    assert not list(conf.out.parent.glob("**/*.part"))


def test_neighbour_table_names_every_photo_of_the_grid_with_its_station_and_date(built_report):
    import pandas as pd

    conf, _ = built_report
    page = conf.out.read_text(encoding="utf-8")
    shown = re.search(r'<table id="neighbour-table">(.*?)</table>', page).group(1)
    header = re.findall(r"<th>([^<]*)</th>", shown)
    table = pd.DataFrame([[html.unescape(cell) for cell in re.findall(r"<td>([^<]*)</td>", row)]
                          for row in re.findall(r'<tr class="neighbour[^"]*">(.*?)</tr>', shown)], columns=header)
    table["grid row"] = table["grid row"].astype(int)
    labels = pd.read_csv(conf.data, dtype=str).set_index("filename")
    assert list(table.columns) == ["grid row", "rank", "filename", "identity", "similarity", "same individual",
                                   "station", "camera", "date", "time"]
    assert set(table["filename"]) <= set(labels.index)
    for column in ("identity", "station", "date"):
        assert (table[column].astype(str) == labels.loc[table["filename"], column].to_numpy()).all()
    for _, group in table.groupby("grid row"):
        assert group["rank"].tolist() == ["query", "1", "2", "3"]  # top_k 3; every query has 3 gallery photos
        query_identity = group["identity"].iat[0]
        assert (group["same individual"].iloc[1:] == (group["identity"].iloc[1:] == query_identity).map({True: "yes", False: "no"})).all()
        similarities = group["similarity"].iloc[1:].astype(float)
        assert similarities.is_monotonic_decreasing
    assert table["grid row"].nunique() == 3  # one query per identity of the held-out split


def test_tsne_perplexity_fits_small_sets():
    from spotmatch.report.interactive import tsne_2d, tsne_perplexity

    assert tsne_perplexity(5) < 5 and tsne_perplexity(10_000) == 30
    points = np.random.default_rng(0).normal(size=(6, 8))
    assert tsne_2d(points, seed=0).shape == (6, 2)
    assert tsne_2d(points[:3], seed=0) is None


def test_fusion_reliability_png_is_included_only_for_this_model(tmp_path, built_report):
    from test_fusion import synthetic_pairs

    from spotmatch.errors import SpotmatchError
    from spotmatch.fusion.calibration import FusionModel
    from spotmatch.fusion.features import pair_features
    from spotmatch.report.build import reliability_png

    conf, _ = built_report
    table, labels = synthetic_pairs(400)
    FusionModel.new(embedder_id="this-model").fit(pair_features(table), labels).save(tmp_path / "fusion.json")
    (tmp_path / "reliability.png").write_bytes(b"\x89PNG")
    assert reliability_png(conf, "this-model") is None  # nothing beside the tiny checkpoint
    conf_with_fusion = dataclasses.replace(conf, fusion=tmp_path / "fusion.json")
    assert reliability_png(conf_with_fusion, "this-model") == tmp_path / "reliability.png"
    with pytest.raises(SpotmatchError, match="calibrated for embedder 'this-model', not 'another-model'"):
        reliability_png(conf_with_fusion, "another-model")
    (tmp_path / "labels.csv").write_text("filename,identity\n")
    with pytest.raises(SpotmatchError, match="labels.csv: not a readable calibration file"):
        reliability_png(dataclasses.replace(conf, fusion=tmp_path / "labels.csv"), "this-model")


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path, snow_subset_csv):
    out = tmp_path / "report.html"
    result = run_cli("report", "--data", snow_subset_csv, "--checkpoint", tmp_path / "nope.pt", "--out", out)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "checkpoint not found" in result.stderr
    assert not list(tmp_path.iterdir())


def test_an_interrupted_report_leaves_no_figures_and_a_file_in_their_way_is_refused_first(built_report, tmp_path, monkeypatch):
    """Figures are drawn into a staging folder that becomes `<name>_files` only with the page."""
    from spotmatch.errors import SpotmatchError
    from spotmatch.report import build

    conf = dataclasses.replace(built_report[0], out=tmp_path / "r.html")

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_render", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build_report(conf)
    assert not list(tmp_path.iterdir())  # no page, no figures, no staging folder
    (tmp_path / "r_files").touch()
    with pytest.raises(SpotmatchError, match=r"r_files: a file stands where the report keeps its figures; move it"):
        build.check_config(conf)


def test_cli_empty_data_is_one_line(tmp_path, tiny_checkpoint):
    empty = tmp_path / "labels.csv"
    empty.write_text("filename,identity\n")
    result = run_cli("report", "--data", empty, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "report.html")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no labelled images" in result.stderr
    assert not (tmp_path / "report.html").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install chromium); the render check needs a browser")
def test_report_renders_in_headless_chromium(built_report, tmp_path):
    conf, _ = built_report
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        f"--screenshot={shot}", "--window-size=1000,1400", conf.out.resolve().as_uri()],
                       capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
    # The rendered DOM holds the drawn plots (plotly adds its SVG layers only when it actually ran).
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", conf.out.resolve().as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="main-svg"') >= 2
