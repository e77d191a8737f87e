"""The batch jobs (`embed`, `score-pairs`, `match`, `catalogue add`) on a Ray cluster: the same stage
code, more machines.

    with ray_session(RayConfig(address=None)):          # None: a local Ray limited to this machine
        embeddings = embed_on_ray(paths, checkpoint, run, ray_conf, job_dir)
        table = score_pairs_on_ray(pairs, checkpoint, fusion, engine_conf, run, ray_conf, job_dir)
        evidence = match_on_ray(pairs, {"name": "rootsift", "cache_dir": cache}, ray_conf, job_dir)
        report = add_images_on_ray(catalogue, sources, add_conf, ray_conf)

Two kinds of job share one implementation each: an image job (`_image_job`: one row per distinct
image, keyed by its content hash) and a pair job (`_pair_job`: one row per `row_id`). Each actor of a
Ray Data actor pool builds its stage once (`Embedder.from_checkpoint`, `build_local`,
`Engine.from_files`, `LocalMatcher.from_name`) and runs the local backend's own functions on its
batch (`Embedder.embed`, `LocalMatcher.features_many`, `Engine.score_pairs`,
`LocalMatcher.score_pairs`). Output is exactly-once by construction:

* every batch is written by its actor as one Parquet shard, atomically, named by a digest of the work
  it holds (image content hashes; for pairs, each row's row_id with both images' content hashes), so a
  retried batch rewrites the same file, never a half one;
* a re-run submits only the work with no shard yet: images whose hash is in no shard, pair shards whose
  file is missing (a new test file reusing row_ids 0..N for other pairs is new work, never a stale hit);
* the merge keeps one row per key and checks the key set equals the input's, else one-line error.

A SpotmatchError in an actor (a corrupt image) comes back as data, an `error` column, and the driver
raises it as the one line it was: Ray Data wraps a raised one in a traceback that does not carry it.

A pair's `global_rank` is its rank among its query's rows, so pair shards are cut at query
boundaries: each shard holds every row of its queries, and `Engine.score_pairs` sees whole queries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from spotmatch.errors import SpotmatchError

EMBED_KEY = "sha256"
PAIR_KEY = "row_id"
ERROR_COLUMN = "error"  # an actor's SpotmatchError message, "" when its batch succeeded


@dataclass
class ActorPool:
    """The actors of one kind of stage."""

    num_cpus: float = 1.0  # per actor; an embedding actor decodes images in that many threads
    num_gpus: float = 0.0  # per actor; 1 puts one model per GPU
    concurrency: int = 1  # actors in the pool


@dataclass
class RayConfig:
    """Where and how wide the Ray jobs run (not what they compute)."""

    address: str | None = None  # None: start a local Ray on this machine; "auto" or "ray://host:10001": join a cluster
    num_cpus_local: int | None = None  # CPUs of the local Ray that `address=None` starts (None: all of this machine's)
    batch_size: int = 64  # images per embedding batch = rows per embedding shard
    pairs_per_shard: int = 20_000  # pair rows per scoring shard (cut at query boundaries, so a shard may hold more)
    # One pool per kind of stage, so a cluster can run the embedder on GPU actors and keypoints on CPU ones.
    embed: ActorPool = field(default_factory=ActorPool)  # the embedder (decode, resize, forward): GPU-able
    local: ActorPool = field(default_factory=ActorPool)  # local features and pair matching (`match`, keypoints at add)
    score: ActorPool = field(default_factory=ActorPool)  # the Engine on pairs (`score-pairs`): cached embeddings,
    #                                                      local matching and fusion
    max_restarts: int = 3  # a dead actor (OOM, node lost, killed) is restarted this many times ...
    max_task_retries: int = 3  # ... and its in-flight batch re-run on the new one
    worker_pid_dir: str | None = None  # each actor writes its PID here (supervisors and the fault test find workers)


POOLS = ("embed", "local", "score")


def load_ray_config(path: str | Path | None, **overrides) -> RayConfig:
    """A RayConfig from a JSON file (`{"embed": {"num_gpus": 1, "concurrency": 4}, "local": {"concurrency": 30}}`),
    then `overrides` (the command's own flags) where they are not None. Unknown keys are refused: a
    misspelt `num_gpu` must not silently run on CPUs."""
    import json

    values: dict = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SpotmatchError(f"{path}: Ray config file not found; pass a JSON file of RayConfig fields") from None
        except json.JSONDecodeError as error:
            raise SpotmatchError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}); fix the file") from None
        if not isinstance(values, dict):
            raise SpotmatchError(f"{path}: the Ray config must be a JSON object of RayConfig fields")
    values = {**values, **{key: value for key, value in overrides.items() if value is not None}}
    known = {f.name for f in dataclasses.fields(RayConfig)}
    pool_fields = {f.name for f in dataclasses.fields(ActorPool)}
    for key, value in values.items():
        if key not in known:
            raise SpotmatchError(f"{path}: unknown Ray setting '{key}'; known: {', '.join(sorted(known))}")
        if key in POOLS:
            unknown = set(value) - pool_fields if isinstance(value, dict) else {"(not an object)"}
            if unknown:
                raise SpotmatchError(f"{path}: '{key}' takes {', '.join(sorted(pool_fields))}, not {', '.join(sorted(unknown))}")
    pools = {key: ActorPool(**values.pop(key)) for key in POOLS if key in values}
    return RayConfig(**values, **pools)


# ----------------------------------------------------------------------------- cluster


@contextlib.contextmanager
def ray_session(conf: RayConfig) -> Iterator[None]:
    """Join the cluster at `conf.address` (or start a local one); shut down only what this call started."""
    import logging

    import ray
    import ray.data

    # Ray Data logs progress banners every 10 s and per execution; the command's own summary is what
    # counts (set after importing ray.data, which configures its loggers on import).
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... nor the warning that the bars are off, which is this function's own choice: stderr holds only
    # what the user must act on (an error is one line there, like the local backend's).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    if ray.is_initialized():  # a caller (a test, a notebook) already chose the cluster
        yield
        return
    # Ray reads this from the environment at start-up; the tool must not phone home.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # ray.init makes SIGTERM a bare exit; the command's own handler (one line, temporary files removed) stays.
    on_sigterm = signal.getsignal(signal.SIGTERM)
    # Ray's start-up notices ("Started a local Ray instance", token authentication on by default) are
    # INFO or WARNING on the "ray" logger; a job that cannot start still raises.
    if conf.address is None:
        ray.init(num_cpus=conf.num_cpus_local or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    else:
        ray.init(address=conf.address, log_to_driver=False, logging_level=logging.ERROR)
    if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        ray.shutdown()


def _actor_options(conf: RayConfig, pool: ActorPool) -> dict:
    import ray.data

    # Ray 2.60 has no named parameter for the restart limits: they go through the deprecated
    # **ray_remote_args (Ray's actor-pool code reads them from there); `_map_batches` hides the
    # RayDeprecationWarning that this choice brings.
    return dict(batch_size=None, batch_format="pandas", num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
                compute=ray.data.ActorPoolStrategy(size=pool.concurrency),
                max_restarts=conf.max_restarts, max_task_retries=conf.max_task_retries)


def _map_batches(dataset, actor_class, constructor_args: tuple, options: dict):
    """`dataset.map_batches` on an actor pool, without the deprecation warning that `_actor_options` brings."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        return dataset.map_batches(actor_class, fn_constructor_args=constructor_args, **options)


def _record_pid(pid_dir: str | None, role: str) -> None:
    if pid_dir is not None:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"{role}-{os.getpid()}.pid").write_text(str(os.getpid()))


def _actor_run_config(run, cpus: float = 1.0):
    """Inside an actor Ray provides the processes: no DataLoader workers and no progress bars, but the
    actor's own CPUs decode images in threads (else a GPU actor waits on one core's decoding)."""
    from spotmatch.global_embed.embed import EmbedConfig

    return dataclasses.replace(run or EmbedConfig(), num_workers=0, decode_threads=max(1, int(cpus)), progress=False)


def _run(dataset) -> None:
    """Execute the job; raise the first SpotmatchError an actor returned as data, as the one line it was.
    Batches that succeeded keep their shards, so the re-run after the fix computes only the failed ones."""
    results = dataset.to_pandas()
    messages = [message for message in results[ERROR_COLUMN] if message] if ERROR_COLUMN in results else []
    if messages:
        other_errors = len(set(messages)) - 1
        raise SpotmatchError(messages[0] + (f" ({other_errors} other error(s) in other batches; re-run after the fix to see them)"
                                            if other_errors else ""))


class _UserErrorAsData:
    """Base of the batch actors: a SpotmatchError from building the stage or running a batch becomes an
    `error` row instead of an exception (raised, Ray Data would bury it in a wrapped traceback)."""

    def _build(self, build) -> object | None:
        self.build_error = ""
        try:
            return build()
        except SpotmatchError as error:  # reported by every batch this actor gets, then by the driver
            self.build_error = str(error)
            return None

    def _error_row(self, message: str) -> pd.DataFrame:
        return pd.DataFrame({"shard": [""], ERROR_COLUMN: [message]})


# ----------------------------------------------------------------------------- shards


def shard_name(keys) -> str:
    """Deterministic from the work it holds: the same batch always lands in the same file."""
    digest = hashlib.sha256("\n".join(sorted(map(str, keys))).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def write_shard(table, target: Path) -> Path:
    """One Parquet file, written beside its final name and renamed (a killed writer leaves no shard)."""
    import pyarrow.parquet as pq

    from spotmatch.io import atomic_path

    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return target


def keys_written(folder: Path, key: str) -> set:
    """Keys already in the job folder's shards (a re-run skips them)."""
    import pyarrow.parquet as pq

    return {k for shard in sorted(folder.glob("part-*.parquet")) for k in pq.read_table(shard, columns=[key]).column(key).to_pylist()}


def read_shards(folder: Path, names: list[str] | None = None) -> pd.DataFrame:
    """Every shard in the folder, or only those `names` (a pair job's folder also holds other inputs' shards)."""
    import pyarrow.parquet as pq

    shards = sorted(folder.glob("part-*.parquet")) if names is None else [folder / name for name in names]
    return pd.concat([pq.read_table(s).to_pandas() for s in shards], ignore_index=True) if shards else pd.DataFrame()


def check_exactly_once(merged: pd.DataFrame, key: str, expected: list, job_folder: Path) -> pd.DataFrame:
    """One row per expected key, in the input's order; else a one-line error naming what is off."""
    merged = merged[merged[key].isin(set(expected))].drop_duplicates(key)
    missing = set(expected) - set(merged[key])
    if missing:
        raise SpotmatchError(f"{job_folder}: {len(missing)} of {len(expected)} {key}s have no result after the Ray job "
                             f"(e.g. {sorted(map(str, missing))[0]!r}); re-run the same command to compute only those")
    return merged.set_index(key).loc[expected].reset_index()


# ----------------------------------------------------------------------------- image jobs


class EmbeddingStage:
    """Image stage: the checkpoint's embedding of each image (`Embedder.embed`)."""

    role = "embed"

    def __init__(self, checkpoint: str, run, cpus: float):
        from spotmatch.global_embed.embed import Embedder

        self.embedder = Embedder.from_checkpoint(checkpoint, _actor_run_config(run, cpus))

    def __call__(self, paths: list[str]) -> dict:
        import pyarrow as pa

        embeddings = self.embedder.embed(paths).astype(np.float32)
        flat = pa.array(embeddings.ravel(), type=pa.float32())
        return {"embedding": pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1])}


class FeatureStage:
    """Image stage: local features into the local stage's on-disk cache (`LocalMatcher.features_many`),
    which must sit on storage every node sees; the shard records how many keypoints each image got."""

    role = "features"

    def __init__(self, engine_conf, embedder_masks: str):
        from spotmatch.engine.engine import build_local

        self.local = build_local(engine_conf, embedder_masks)

    def __call__(self, paths: list[str]) -> dict:
        features = self.local.features_many(paths)
        return {"keypoints": [len(features[p]) for p in paths]}


class ImageBatch(_UserErrorAsData):
    """Actor: its stage (a model) loads once in __init__; each call runs the stage on one batch of
    distinct images and writes their shard."""

    def __init__(self, build_stage, shard_folder: str, pid_dir: str | None):
        self.stage = self._build(build_stage)
        _record_pid(pid_dir, self.stage.role if self.stage is not None else "unbuilt")
        self.shard_folder = Path(shard_folder)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import pyarrow as pa

        if self.build_error:
            return self._error_row(self.build_error)
        try:
            columns = self.stage(batch["path"].tolist())
        except SpotmatchError as error:
            return self._error_row(str(error))
        table = pa.table({EMBED_KEY: batch[EMBED_KEY].tolist(), "path": batch["path"].tolist(), **columns})
        shard = write_shard(table, self.shard_folder / shard_name(batch[EMBED_KEY]))
        return pd.DataFrame({"shard": [shard.name], ERROR_COLUMN: [""]})


def content_hashes(paths) -> dict[str, str]:
    """Each distinct path's content hash, each file read once: what names an image's work."""
    from spotmatch.data.images import file_sha256

    return {path: file_sha256(path) for path in dict.fromkeys(map(str, paths))}


def _image_job(paths: list, build_stage, folder: Path, conf: RayConfig, pool: ActorPool,
               sha256_of: dict[str, str] | None = None) -> tuple[list[str], pd.DataFrame]:
    """Run `build_stage()` over each distinct image (by content) once: (hash per path, one merged row per hash).
    `sha256_of` (from `content_hashes`) spares reading files a caller has hashed already."""
    import ray.data

    folder.mkdir(parents=True, exist_ok=True)
    sha256_of = sha256_of or content_hashes(paths)
    hashes = [sha256_of[str(p)] for p in paths]
    first_path_of = dict(zip(reversed(hashes), reversed([str(p) for p in paths])))  # first occurrence wins
    todo = sorted(set(first_path_of) - keys_written(folder, EMBED_KEY))
    if todo:
        rows = pd.DataFrame({EMBED_KEY: todo, "path": [first_path_of[h] for h in todo]})
        # One input block per batch, built here: no repartition task competing with the actors for CPUs
        # (on a small cluster a pool that holds every CPU would otherwise wait on it forever).
        blocks = [rows.iloc[i:i + conf.batch_size] for i in range(0, len(rows), conf.batch_size)]
        dataset = _map_batches(ray.data.from_pandas(blocks), ImageBatch, (build_stage, str(folder), conf.worker_pid_dir),
                               {**_actor_options(conf, pool), "batch_size": conf.batch_size})
        _run(dataset)
    return hashes, check_exactly_once(read_shards(folder), EMBED_KEY, list(dict.fromkeys(hashes)), folder)


def embedding_shard_folder(job_dir: Path, model_id: str) -> Path:
    return Path(job_dir) / "embeddings" / model_id


def embed_on_ray(paths: list, checkpoint: str | Path, run, conf: RayConfig, job_dir: str | Path,
                 model_id: str | None = None, sha256_of: dict[str, str] | None = None) -> np.ndarray:
    """`Embedder.embed(paths)` on a Ray actor pool: (n, d) float32 in `paths` order, each distinct image once."""
    from spotmatch.global_embed.embed import Embedder

    model_id = model_id or Embedder.from_checkpoint(checkpoint, _actor_run_config(run)).model_id
    hashes, merged = _image_job(paths, functools.partial(EmbeddingStage, str(checkpoint), run, conf.embed.num_cpus),
                                embedding_shard_folder(Path(job_dir), model_id), conf, conf.embed, sha256_of)
    by_hash = dict(zip(merged[EMBED_KEY], merged["embedding"]))
    return np.stack([np.asarray(by_hash[h], dtype=np.float32) for h in hashes])


@dataclass
class RayEmbedder:
    """Stands in for an `Embedder` where only `embed(paths)` is used (`global_pair_scores`): embeds on the pool."""

    checkpoint: str
    run: object
    conf: RayConfig
    job_dir: Path

    def embed(self, paths: list) -> np.ndarray:
        return embed_on_ray(paths, self.checkpoint, self.run, self.conf, self.job_dir)


def extract_features_on_ray(paths: list, engine_conf, embedder_masks: str, conf: RayConfig, job_dir: str | Path) -> pd.DataFrame:
    """Fill the local-feature cache for each distinct image, spread over the pool: (sha256, path, keypoints)."""
    from spotmatch.config import config_hash
    from spotmatch.engine.engine import build_local

    settings = {"local_stage": build_local(engine_conf, embedder_masks).conf_name, "masks": engine_conf.masks or embedder_masks}
    folder = Path(job_dir) / "features" / config_hash(settings)
    _, merged = _image_job(paths, functools.partial(FeatureStage, engine_conf, embedder_masks), folder, conf, conf.local)
    return merged


# ----------------------------------------------------------------------------- pair jobs


def query_bounded_shards(pairs: pd.DataFrame, rows_per_shard: int) -> list[np.ndarray]:
    """Row positions per shard, every query's rows in one shard (its `global_rank` needs them all)."""
    by_query = pairs.groupby("query_image_path", sort=True, group_keys=False).indices
    shards, current = [], []
    for positions in by_query.values():
        current.extend(positions)
        if len(current) >= rows_per_shard:
            shards.append(np.sort(np.array(current)))
            current = []
    if current:
        shards.append(np.sort(np.array(current)))
    return shards


class PairBatch(_UserErrorAsData):
    """Actor: its scorer (an Engine, or a LocalMatcher) loads once; each call scores whole queries' rows
    with the scorer's `score_pairs` and writes their shard under the name the driver gave it."""

    def __init__(self, build_scorer, pairs: pd.DataFrame, shard_folder: str, pid_dir: str | None):
        self.scorer = self._build(build_scorer)
        _record_pid(pid_dir, "score")
        self.pairs, self.shard_folder = pairs, Path(shard_folder)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import pyarrow as pa

        if self.build_error:
            return self._error_row(self.build_error)
        written = []
        for positions, name in zip(batch["positions"], batch["shard"]):
            rows = self.pairs.iloc[np.asarray(positions)]
            try:
                scored = self.scorer.score_pairs(rows)
            except SpotmatchError as error:
                return self._error_row(str(error))
            if PAIR_KEY not in scored.columns:  # the local stage returns evidence columns by row position
                scored.insert(0, PAIR_KEY, rows[PAIR_KEY].to_numpy())
            written.append(write_shard(pa.Table.from_pandas(scored, preserve_index=False), self.shard_folder / name).name)
        return pd.DataFrame({"shard": written, ERROR_COLUMN: [""] * len(written)})


def pair_images(pairs: pd.DataFrame) -> list[str]:
    """Each image a pairs table names, once, queries first."""
    return list(dict.fromkeys(map(str, [*pairs["query_image_path"], *pairs["gallery_image_path"]])))


def pair_work(pairs: pd.DataFrame, sha256_of: dict[str, str]) -> pd.Series:
    """What decides a row's result besides the job folder's settings: its row_id and the content of both
    its images (`sha256_of`, from `content_hashes`). Kaggle row_ids are 0..N in every test file, so a
    row_id alone names no work; content, not path, so a photo replaced under the same name is new work too."""
    def hash_of(column: str) -> pd.Series:
        return pairs[column].astype(str).map(sha256_of)

    return pairs[PAIR_KEY].astype(str) + "\t" + hash_of("query_image_path") + "\t" + hash_of("gallery_image_path")


def _pair_job(pairs: pd.DataFrame, build_scorer, folder: Path, conf: RayConfig, pool: ActorPool,
              sha256_of: dict[str, str] | None = None) -> pd.DataFrame:
    """`build_scorer().score_pairs` over `pairs` on an actor pool: one row per row_id, in the input's order.

    A shard is named by the work of all its rows (a row's rank, hence its score, depends on its query's
    other rows), so an existing file is exactly this work done, and the merge reads only this input's files."""
    import ray.data

    folder.mkdir(parents=True, exist_ok=True)
    work = pair_work(pairs, sha256_of or content_hashes(pair_images(pairs))).to_numpy()
    positions_per_shard = query_bounded_shards(pairs, conf.pairs_per_shard)
    names = [shard_name(work[positions]) for positions in positions_per_shard]
    todo = [(positions, name) for positions, name in zip(positions_per_shard, names) if not (folder / name).exists()]
    if todo:
        blocks = [pd.DataFrame({"positions": [positions.tolist()], "shard": [name]}) for positions, name in todo]
        dataset = _map_batches(ray.data.from_pandas(blocks), PairBatch, (build_scorer, pairs, str(folder), conf.worker_pid_dir),
                               {**_actor_options(conf, pool), "batch_size": 1})
        _run(dataset)
    return check_exactly_once(read_shards(folder, names), PAIR_KEY, pairs[PAIR_KEY].tolist(), folder)


def pair_shard_folder(job_dir: Path, model_id: str, fusion_path, engine_conf) -> Path:
    """Scores depend on the model, the calibration file and the engine settings: each set gets its own folder."""
    from spotmatch.config import config_hash
    from spotmatch.io import file_digest

    # Where the local stage runs changes no score.
    conf = {key: value for key, value in dataclasses.asdict(engine_conf).items() if key != "local_device"}
    settings = {"conf": conf, "fusion": file_digest(fusion_path) if fusion_path else None}
    return Path(job_dir) / "pairs" / f"{model_id}-{config_hash(settings)}"


def check_pair_scoring(engine_conf) -> None:
    """Refuse, before a cluster is started, what shards holding whole queries cannot score."""
    if engine_conf.rerank == "k-reciprocal":
        raise SpotmatchError("--rerank k-reciprocal needs every image of the file at once, which shards by query do not have; "
                             "use --backend local, or --rerank qe")


def score_pairs_on_ray(pairs: pd.DataFrame, checkpoint: str | Path, fusion_path: str | Path | None, engine_conf, run,
                       conf: RayConfig, job_dir: str | Path) -> pd.DataFrame:
    """`Engine.score_pairs(pairs)` on a Ray actor pool: the same table, in the input's row order. Shards hold
    whole queries, so query expansion (which reads a query's own rows) gives the local backend's scores."""
    from spotmatch.engine.engine import Engine
    from spotmatch.global_embed.embed import Embedder

    check_pair_scoring(engine_conf)

    # No SQLite pair cache on cluster storage (its locking is not safe over a network file system); the
    # shards already let a re-run skip finished work.
    engine_conf = dataclasses.replace(engine_conf, cache_pairs=False)
    model_id = Embedder.from_checkpoint(checkpoint, _actor_run_config(run)).model_id
    images = pair_images(pairs)
    sha256_of = content_hashes(images)  # read once, for the embedding job and the shard names both
    if run is None or run.cache_dir:
        # Fill the shared embedding cache with each distinct image once, spread over the pool, so the
        # scoring actors (which may share gallery images) only read it. Needs a cache on shared storage.
        embed_on_ray(images, checkpoint, run, conf, job_dir, model_id, sha256_of)
    build_engine = functools.partial(Engine.from_files, str(checkpoint), str(fusion_path) if fusion_path else None,
                                     engine_conf, _actor_run_config(run, conf.score.num_cpus))
    return _pair_job(pairs, build_engine, pair_shard_folder(Path(job_dir), model_id, fusion_path, engine_conf), conf, conf.score,
                     sha256_of)


def match_on_ray(pairs: pd.DataFrame, engine_conf, embedder_masks: str, conf: RayConfig, job_dir: str | Path) -> pd.DataFrame:
    """`build_local(engine_conf, embedder_masks).score_pairs(pairs)` on a Ray actor pool: row_id and the evidence
    columns, in the input's row order. Features land in `engine_conf.cache_dir` (shared storage)."""
    from spotmatch.config import config_hash
    from spotmatch.engine.engine import build_local

    # The stage's name holds every setting that changes the evidence (extractor, matcher, masks); workers and
    # device do not.
    folder = Path(job_dir) / "matches" / config_hash({"local_stage": build_local(engine_conf, embedder_masks).conf_name})
    return _pair_job(pairs, functools.partial(build_local, engine_conf, embedder_masks), folder, conf, conf.local)


# ----------------------------------------------------------------------------- catalogue


def add_images_on_ray(catalogue, sources: list, add_conf, conf: RayConfig, job_dir: str | Path | None = None):
    """`catalogue add` with the heavy stages on Ray: the new images' embeddings (and local features)
    are computed on the pool into shards, then inserted in **one** catalogue transaction. A run
    interrupted before the insert leaves the catalogue untouched; its re-run reuses the shards."""
    from spotmatch.catalogue.service import AddReport, fresh_sources, insert_fresh, open_engine, refuse_misleading_labels
    from spotmatch.global_embed.embed import EmbedConfig

    engine = open_engine(catalogue)  # checks the catalogue's model before any work
    refuse_misleading_labels(catalogue, sources)  # as the local add does: "cat21" beside Cat21 is a typo, a former name stale
    job_dir = Path(job_dir) if job_dir else catalogue.folder / "ray-job"
    report = AddReport()
    fresh = fresh_sources(catalogue, sources, report)
    if not fresh:
        return report
    paths = [str(source.path) for source, _, _ in fresh]
    run = EmbedConfig(num_workers=0, cache_dir=str(catalogue.cache_dir), progress=False)  # device: a GPU actor's if any
    embeddings = embed_on_ray(paths, catalogue.settings().checkpoint, run, conf, job_dir, engine.embedder.model_id)
    feature_key = None
    if engine.local is not None and add_conf.local_features:
        extract_features_on_ray(paths, engine.conf, engine.embedder.conf.masks, conf, job_dir)
        feature_key = engine.local.extractor.conf_name
    insert_fresh(catalogue, fresh, embeddings, engine.embedder.model_id, feature_key, add_conf.who, report)
    return report


def default_job_dir(out: str | Path) -> Path:
    """Shards live beside the output file, so a re-run of the same command finds them."""
    out = Path(out)
    return out.with_name(f"{out.name}.ray-job")
