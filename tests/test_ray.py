"""The Ray backend computes what the local backend computes, exactly once, through a killed worker."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

from conftest import SNOW

ray = pytest.importorskip("ray")

from spotmatch.data.tables import load_dataset, load_pairs  # noqa: E402
from spotmatch.engine import ray_backend as rb  # noqa: E402
from spotmatch.engine.engine import Engine, EngineConfig  # noqa: E402
from spotmatch.errors import SpotmatchError  # noqa: E402
from spotmatch.global_embed.embed import EmbedConfig, Embedder  # noqa: E402
from test_cli import assert_one_line_error, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pools(concurrency: int) -> dict:
    """The same actor count for every stage's pool (one CPU each)."""
    return {name: rb.ActorPool(concurrency=concurrency) for name in rb.POOLS}


def no_cache_run() -> EmbedConfig:
    return EmbedConfig(num_workers=0, cache_dir=None, progress=False)


@pytest.fixture()
def pairs_table(tmp_path, snow_subset_csv) -> pd.DataFrame:
    """Every ordered pair among 8 images: several rows per query, so global_rank is exercised."""
    names = pd.read_csv(snow_subset_csv)["filename"].tolist()[:8]
    rows = [(q, g) for q in names for g in names if q != g]
    pairs = pd.DataFrame({"row_id": [f"r{i}" for i in range(len(rows))], "query_image": [q for q, _ in rows],
                          "gallery_image": [g for _, g in rows]})
    (tmp_path / "images").symlink_to(SNOW / "images")
    pairs.to_csv(tmp_path / "test.csv", index=False)
    return load_pairs(tmp_path / "test.csv")


def test_embeddings_match_local_and_rerun_skips_done_shards(ray_cluster, tmp_path, snow_subset_csv, tiny_checkpoint):
    paths = load_dataset(snow_subset_csv).paths
    local = Embedder.from_checkpoint(tiny_checkpoint, no_cache_run()).embed(paths)
    conf = rb.RayConfig(batch_size=4, **pools(2))
    on_ray = rb.embed_on_ray(paths, tiny_checkpoint, no_cache_run(), conf, tmp_path / "job")
    np.testing.assert_allclose(on_ray, local, atol=1e-5)

    shards = sorted((tmp_path / "job").rglob("part-*.parquet"))
    stamps = [s.stat().st_mtime_ns for s in shards]
    again = rb.embed_on_ray(paths, tiny_checkpoint, no_cache_run(), conf, tmp_path / "job")
    assert [s.stat().st_mtime_ns for s in sorted((tmp_path / "job").rglob("part-*.parquet"))] == stamps  # nothing recomputed
    np.testing.assert_array_equal(again, on_ray)


def test_pair_scores_match_local(ray_cluster, tmp_path, pairs_table, tiny_checkpoint):
    conf = EngineConfig(use_local=False, cache_dir=None)
    local = Engine.from_files(tiny_checkpoint, None, conf, no_cache_run()).score_pairs(pairs_table)
    ray_conf = rb.RayConfig(pairs_per_shard=10, **pools(2))  # several shards, each whole queries
    on_ray = rb.score_pairs_on_ray(pairs_table, tiny_checkpoint, None, conf, no_cache_run(), ray_conf, tmp_path / "job")
    assert on_ray["row_id"].tolist() == pairs_table["row_id"].tolist()
    assert len(list((tmp_path / "job").rglob("part-*.parquet"))) > 1
    np.testing.assert_allclose(on_ray["cosine"], local["cosine"], atol=1e-5)
    assert on_ray["global_rank"].tolist() == local["global_rank"].tolist()
    np.testing.assert_allclose(on_ray["similarity"], local["similarity"], atol=1e-5)


def test_pair_scoring_reads_each_image_once_to_name_its_work(ray_cluster, tmp_path, pairs_table, tiny_checkpoint,
                                                              monkeypatch):
    """The embedding job and the pair shards' names share one content hash per image (on cluster
    storage a second read of every photo is a second pass over the data set)."""
    import spotmatch.data.images as images

    hashed = []
    real_sha256 = images.file_sha256
    monkeypatch.setattr(images, "file_sha256", lambda path: hashed.append(str(path)) or real_sha256(path))
    conf = EngineConfig(use_local=False, cache_dir=None)
    cached_run = EmbedConfig(num_workers=0, cache_dir=str(tmp_path / "cache"), progress=False)
    rb.score_pairs_on_ray(pairs_table, tiny_checkpoint, None, conf, cached_run, rb.RayConfig(**pools(2)), tmp_path / "job")
    assert sorted(hashed) == sorted(set(pairs_table["query_image_path"]) | set(pairs_table["gallery_image_path"]))


def test_pair_shards_are_reused_for_the_same_pairs_only(ray_cluster, tmp_path, pairs_table, tiny_checkpoint):
    """A re-run of the same input recomputes nothing (resume); a new file with the same row_ids but other
    pairs (query and gallery swapped, as a second Kaggle test file reuses row_ids) gets its own scores."""
    conf = EngineConfig(use_local=False, cache_dir=None)
    ray_conf = rb.RayConfig(pairs_per_shard=10, **pools(2))
    job = tmp_path / "job"
    first = rb.score_pairs_on_ray(pairs_table, tiny_checkpoint, None, conf, no_cache_run(), ray_conf, job)
    shards = {s: s.stat().st_mtime_ns for s in (job / "pairs").rglob("part-*.parquet")}
    lost = sorted(shards)[0]
    lost.unlink()  # an interrupted run: one shard never written
    resumed = rb.score_pairs_on_ray(pairs_table, tiny_checkpoint, None, conf, no_cache_run(), ray_conf, job)
    assert {s: s.stat().st_mtime_ns for s in shards if s != lost} == {s: t for s, t in shards.items() if s != lost}
    assert lost.exists()  # only the missing shard was computed again
    pd.testing.assert_frame_equal(resumed, first)

    swapped = pairs_table.copy()
    for side in ("_image", "_image_path"):
        swapped[["query" + side, "gallery" + side]] = pairs_table[["gallery" + side, "query" + side]].to_numpy()
    local = Engine.from_files(tiny_checkpoint, None, conf, no_cache_run()).score_pairs(swapped)
    on_ray = rb.score_pairs_on_ray(swapped, tiny_checkpoint, None, conf, no_cache_run(), ray_conf, job)
    assert on_ray["row_id"].tolist() == swapped["row_id"].tolist()
    assert on_ray["global_rank"].tolist() == local["global_rank"].tolist()
    assert on_ray["global_rank"].tolist() != first["global_rank"].tolist()  # the old pairs' ranks: a stale answer fails
    np.testing.assert_allclose(on_ray["similarity"], local["similarity"], atol=1e-5)


@pytest.fixture()
def corrupt_images(tmp_path, snow_subset_csv) -> tuple:
    """Three snow-leopard JPEGs copied into `bad/`, the first cut to a third (it cannot be decoded), and a pairs
    CSV of every ordered pair among them: (pairs CSV, the corrupt image)."""
    names = pd.read_csv(snow_subset_csv)["filename"].tolist()[:3]
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes((SNOW / "images" / name).read_bytes())
    corrupt = folder / names[0]
    corrupt.write_bytes(corrupt.read_bytes()[:corrupt.stat().st_size // 3])
    rows = [(q, g) for q in names for g in names if q != g]
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"row_id": range(len(rows)), "query_image": [q for q, _ in rows], "gallery_image": [g for _, g in rows]}).to_csv(csv, index=False)
    return csv, corrupt


def test_corrupt_image_in_an_actor_is_one_line_error(ray_cluster, tmp_path, corrupt_images, tiny_checkpoint):
    csv, corrupt = corrupt_images
    paths = sorted(corrupt.parent.iterdir())
    with pytest.raises(SpotmatchError) as error:
        rb.embed_on_ray(paths, tiny_checkpoint, no_cache_run(), rb.RayConfig(batch_size=2), tmp_path / "job")
    message = str(error.value)
    assert str(corrupt) in message and "cannot decode image" in message and "\n" not in message
    assert len(list((tmp_path / "job").rglob("part-*.parquet"))) == 1  # the good batch is kept for the re-run


def test_cli_ray_corrupt_image_exits_2_with_one_line_and_no_output(tmp_path, corrupt_images):
    csv, corrupt = corrupt_images
    out = tmp_path / "e.csv"
    result = run_cli("match", csv, "--images", corrupt.parent, "--top-k", "0", "--backend", "ray", "--out", out,
                     "--cache", tmp_path / "cache")
    # Ray's core worker logs one line of its own for any Ray Data actor pool with restarts (ray-project/ray
    # issue 57733, not silenceable from Python); every other line must be the error.
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if "core_worker.cc" not in line)
    assert "Traceback" not in result.stderr
    assert_one_line_error(result, str(corrupt), "cannot decode image")
    assert not out.exists()


def test_ray_config_file_sets_each_pool_and_refuses_typos(tmp_path):
    config = tmp_path / "ray.json"
    config.write_text('{"embed": {"num_gpus": 1, "concurrency": 4}, "local": {"concurrency": 30}, "batch_size": 128}')
    conf = rb.load_ray_config(config, address="auto", batch_size=None)
    assert (conf.embed.num_gpus, conf.embed.concurrency, conf.local.num_gpus, conf.local.concurrency) == (1, 4, 0, 30)
    assert (conf.address, conf.batch_size, conf.score) == ("auto", 128, rb.ActorPool())
    assert rb.load_ray_config(config, batch_size=16).batch_size == 16  # the command's flag wins
    for text, message in (('{"embed": {"num_gpu": 1}}', "'embed' takes concurrency, num_cpus, num_gpus, not num_gpu"),
                          ('{"concurency": 2}', "unknown Ray setting 'concurency'"),
                          ('{"embed": 2', "not valid JSON")):
        config.write_text(text)
        with pytest.raises(SpotmatchError, match=message) as error:
            rb.load_ray_config(config)
        assert str(config) in str(error.value) and "\n" not in str(error.value)


def test_merge_names_missing_rows_in_one_line(tmp_path):
    merged = pd.DataFrame({"row_id": ["a", "b", "b"], "similarity": [0.1, 0.2, 0.2]})
    assert rb.check_exactly_once(merged, "row_id", ["b", "a"], tmp_path)["row_id"].tolist() == ["b", "a"]
    with pytest.raises(SpotmatchError) as error:
        rb.check_exactly_once(merged, "row_id", ["a", "b", "c"], tmp_path)
    assert "1 of 3 row_ids have no result" in str(error.value) and "\n" not in str(error.value)


def test_killed_worker_is_restarted_and_output_is_complete(ray_cluster, tmp_path, snow_table, tiny_checkpoint):
    paths = [SNOW / "images" / name for name in snow_table["filename"].head(60)]
    local = Embedder.from_checkpoint(tiny_checkpoint, no_cache_run()).embed(paths)
    pid_dir = tmp_path / "pids"
    conf = rb.RayConfig(batch_size=1, max_restarts=2, max_task_retries=2,
                        worker_pid_dir=str(pid_dir))
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(out=rb.embed_on_ray(paths, tiny_checkpoint, no_cache_run(), conf,
                                                                            tmp_path / "job")))
    job.start()
    # Generous: on a loaded 2-core machine the actor took over 2 minutes to start. Not a speed check.
    deadline = time.monotonic() + 600
    while not list((tmp_path / "job").rglob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.01)  # wait until the actor is mid-job: it has written a shard, more batches are pending
    pid_files = list(pid_dir.glob("embed-*.pid"))
    assert pid_files, "no embedding actor wrote its pid within 10 minutes"
    victim = int(pid_files[0].read_text())
    os.kill(victim, signal.SIGKILL)
    job.join(timeout=180)
    assert not job.is_alive()
    n_shards = len(list((tmp_path / "job").rglob("part-*.parquet")))
    assert 1 <= n_shards <= len(paths)
    assert len(list(pid_dir.glob("embed-*.pid"))) >= 2, "Ray did not restart the killed actor"
    np.testing.assert_allclose(result["out"], local, atol=1e-5)


def test_cli_score_pairs_ray_writes_the_local_submission(tmp_path, pairs_table, tiny_checkpoint):
    csv = tmp_path / "test.csv"
    common = ["score-pairs", csv, "--checkpoint", tiny_checkpoint, "--num-workers", "0"]
    assert run_cli(*common, "--out", tmp_path / "local.csv", "--cache-dir", tmp_path / "cache_local").returncode == 0
    # Its own cache, so the Ray run embeds for itself (its pre-embedding stage fills this cache).
    result = run_cli(*common, "--out", tmp_path / "ray.csv", "--cache-dir", tmp_path / "cache_ray", "--backend", "ray")
    assert result.returncode == 0, result.stderr
    local, on_ray = pd.read_csv(tmp_path / "local.csv"), pd.read_csv(tmp_path / "ray.csv")
    assert on_ray["row_id"].tolist() == local["row_id"].tolist()
    np.testing.assert_allclose(on_ray["similarity"], local["similarity"], atol=1e-6)
    assert list((tmp_path / "cache_ray" / "embeddings").rglob("*.npy"))


def test_match_on_ray_gives_the_local_evidence(ray_cluster, tmp_path, pairs_table):
    from spotmatch.engine.engine import build_local

    conf = EngineConfig(cache_dir=str(tmp_path / "cache"), local_workers=1, cache_pairs=False)
    local = build_local(conf, "alpha").score_pairs(pairs_table)
    ray_conf = rb.RayConfig(pairs_per_shard=14, **pools(2))
    on_ray = rb.match_on_ray(pairs_table, conf, "alpha", ray_conf, tmp_path / "job")
    assert on_ray["row_id"].tolist() == pairs_table["row_id"].tolist()
    assert len(list((tmp_path / "job" / "matches").rglob("part-*.parquet"))) > 1
    assert (local["inliers"] > 0).any()
    for column in ("matches", "inliers"):
        assert on_ray[column].tolist() == local[column].tolist()
    np.testing.assert_allclose(on_ray["local_score"], local["local_score"], atol=1e-6)


def test_catalogue_add_on_ray_stores_what_the_local_add_stores(ray_cluster, tmp_path, snow_subset_csv, tiny_checkpoint):
    from spotmatch.catalogue.service import AddConfig, add_images, init_catalogue, open_engine, sources_from_csv
    from spotmatch.catalogue.store import blob_to_embedding

    def stored(catalogue) -> dict:
        rows = catalogue.db.execute("SELECT sha256, embedding FROM images").fetchall()
        return {row["sha256"]: blob_to_embedding(row["embedding"]) for row in rows}

    sources = sources_from_csv(snow_subset_csv)
    local_catalogue = init_catalogue(tmp_path / "local", tiny_checkpoint, None)
    engine = open_engine(local_catalogue)
    add_images(local_catalogue, engine.embedder, engine.local, sources)
    ray_catalogue = init_catalogue(tmp_path / "ray", tiny_checkpoint, None)
    report = rb.add_images_on_ray(ray_catalogue, sources, AddConfig(), rb.RayConfig(batch_size=8, **pools(2)))
    assert (report.added, report.failed) == (len(sources), [])
    local_rows, ray_rows = stored(local_catalogue), stored(ray_catalogue)
    assert set(ray_rows) == set(local_rows)
    for sha, embedding in local_rows.items():
        np.testing.assert_allclose(ray_rows[sha], embedding, atol=1e-5)
    assert ray_catalogue.stats()["individuals"] == local_catalogue.stats()["individuals"]
    again = rb.add_images_on_ray(ray_catalogue, sources, AddConfig(), rb.RayConfig(batch_size=8))
    assert (again.added, again.already_there) == (0, len(sources))
    import dataclasses

    from spotmatch.errors import SpotmatchError

    typo = [dataclasses.replace(sources[0], identity=sources[0].identity.lower())]  # "cat1" beside Cat1, as the local add refuses
    with pytest.raises(SpotmatchError, match="too like the catalogue's"):
        rb.add_images_on_ray(ray_catalogue, typo, AddConfig(), rb.RayConfig(batch_size=8))


def test_features_on_ray_fill_the_local_stages_cache(ray_cluster, tmp_path, snow_subset_csv):
    from spotmatch.engine.engine import EngineConfig, build_local

    paths = [str(p) for p in load_dataset(snow_subset_csv).paths[:6]]
    conf = EngineConfig(cache_dir=str(tmp_path / "cache"), masks="alpha")
    table = rb.extract_features_on_ray(paths, conf, "alpha", rb.RayConfig(batch_size=3, **pools(2)), tmp_path / "job")
    local = build_local(EngineConfig(cache_dir=str(tmp_path / "fresh_cache"), masks="alpha"), "alpha")
    counts = dict(zip(table["path"], table["keypoints"]))
    assert [counts[p] for p in paths] == [len(local.features(p)) for p in paths]
    cached = build_local(conf, "alpha")
    assert all(cached.cache.cached(sha) is not None for sha in table["sha256"])
