"""Batched, cached embedding: each distinct image (by content hash) is embedded once per model."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from spotmatch.config import DEFAULT_CACHE, config_hash
from spotmatch.device import resolve_device
from spotmatch.data.images import file_sha256
from spotmatch.errors import SpotmatchError
from spotmatch.global_embed.checkpoint import load_model
from spotmatch.io import file_digest
from spotmatch.global_embed.device_decode import decoded_on_device
from spotmatch.global_embed.loading import ImageTensorDataset, iterate_batches
from spotmatch.global_embed.model import MEMORY_FORMAT, EmbedderConfig, ReIDNet
from spotmatch.global_embed.transforms import normalise
from spotmatch.io import save_npy, write_cache_entry




@dataclass
class EmbedConfig:
    """How to run an embedder (not what it is): batch size, device, test-time flip, cache."""

    batch_size: int = 32
    num_workers: int = 2
    decode_threads: int = 0  # with num_workers=0: decode in this many threads instead (a Ray actor's CPUs)
    device: str = "auto"  # "auto" picks CUDA when present
    flip_tta: bool = False  # average with the mirrored image; off by default (flanks differ)
    # Decode plain JPEGs on the device (nvJPEG on a GPU; global_embed.device_decode) instead of in the
    # workers. The network sees the same pixels but for the CPU's draft decoding of large JPEGs (embeddings
    # within 0.1 % in cosine), so both share one cache. Off by default: its speed on a GPU is not measured yet.
    decode_on_device: bool = False
    cache_dir: str | None = DEFAULT_CACHE  # None: no disk cache (masks included)
    cache_embeddings: bool = True  # False while the model is still changing (validation in training)
    progress: bool = True


def mask_provider(source: str, cache_dir: str | None, device: torch.device | str = "cpu"):
    """The segmentation stage's MaskProvider, or None when only the images' own alpha masks count
    (images carrying an alpha channel always use it, whatever the source)."""
    if source == "alpha":
        return None
    from spotmatch.segmentation import MaskConfig, MaskProvider

    return MaskProvider.from_config(MaskConfig(source=source), cache_dir, device=str(device))


class NonFiniteEmbeddings(SpotmatchError):
    """The network's output holds NaN or infinity: its weights overflow (a training run that diverged)."""


class Embedder:
    """`embed(paths) -> (n, d)` float32, L2-normalised."""

    def __init__(self, model: ReIDNet, conf: EmbedderConfig, identity: str, run: EmbedConfig | None = None,
                 use_neck: bool = True):
        self.conf, self.run = conf, run or EmbedConfig()
        self.device = resolve_device(self.run.device)
        self.model = model.to(self.device, memory_format=MEMORY_FORMAT).eval()
        self.use_neck = use_neck
        # The mask source is part of the embedder's config: it defines what the network sees.
        self.masks = mask_provider(conf.masks, self.run.cache_dir, self.device)
        # Everything that changes the numbers is in the cache name.
        self.model_id = f"{conf.backbone}-{config_hash({'model': identity, 'conf': conf.__dict__, 'neck': use_neck, 'flip': self.run.flip_tta})}"

    @classmethod
    def from_checkpoint(cls, path: str | Path, run: EmbedConfig | None = None) -> "Embedder":
        model, conf, _ = load_model(path)
        return cls(model, conf, identity=file_digest(path), run=run)

    @classmethod
    def pretrained_baseline(cls, conf: EmbedderConfig, run: EmbedConfig | None = None) -> "Embedder":
        """The untrained ImageNet backbone with GeM pooling (no neck: an untrained neck is a random projection)."""
        model = ReIDNet(conf)
        return cls(model, conf, identity=f"baseline:{conf.pretrained}", run=run, use_neck=False)

    @property
    def dim(self) -> int:
        return self.conf.embedding_dim if self.use_neck else self.model.backbone.num_features

    def _cache_path(self, sha256: str) -> Path | None:
        if self.run.cache_dir is None or not self.run.cache_embeddings:
            return None
        return Path(self.run.cache_dir) / "embeddings" / self.model_id / sha256[:2] / f"{sha256}.npy"

    @torch.inference_mode()
    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        images = normalise(images.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            views = [images, images.flip(-1)] if self.run.flip_tta else [images]
            features = sum(self.model(v) if self.use_neck else self.model.pool(self.model.backbone(v).float()) for v in views)
        return torch.nn.functional.normalize(features.float(), dim=1)

    def embed(self, paths: list[str | Path]) -> np.ndarray:
        paths = [Path(p) for p in paths]
        hashes = [file_sha256(p) for p in paths]
        first_path_of: dict[str, Path] = {}
        for path, sha in zip(paths, hashes):
            first_path_of.setdefault(sha, path)
        by_hash: dict[str, np.ndarray] = {}
        for sha in first_path_of:
            cache_path = self._cache_path(sha)
            cached = self._read_cached(cache_path) if cache_path is not None else None
            if cached is not None:
                by_hash[sha] = cached
        todo = [sha for sha in first_path_of if sha not in by_hash]
        if todo:
            by_hash.update(self._embed_uncached([first_path_of[s] for s in todo], todo))
        return np.stack([by_hash[sha] for sha in hashes]).astype(np.float32) if hashes else np.zeros((0, self.dim), np.float32)

    def _read_cached(self, cache_path: Path) -> np.ndarray | None:
        """A cached embedding, or None (a miss: embedded again and the entry rewritten) when the file is absent or
        damaged (a crash, a full disk): a cache is never a reason to stop."""
        try:
            embedding = np.load(cache_path)
        except (OSError, ValueError, EOFError):
            return None
        if embedding.shape != (self.dim,) or not np.isfinite(embedding).all():
            return None
        return embedding

    def _embed_uncached(self, paths: list[Path], hashes: list[str]) -> dict[str, np.ndarray]:
        if self.masks is not None:
            self.masks.fill_cache(paths)  # predict masks here once; workers then only read the cache
        dataset = ImageTensorDataset(paths, self.conf, mask_fn=self.masks.mask_for if self.masks else None,
                                     decode_on_device=self.run.decode_on_device)
        results: dict[str, np.ndarray] = {}
        batches = iterate_batches(dataset, self.run.batch_size, self.run.num_workers, pin_memory=self.device.type == "cuda",
                                  threads=self.run.decode_threads)
        if dataset.decode_on_device:
            batches = decoded_on_device(batches, dataset, self.device)
        with tqdm(total=len(paths), desc="embed", unit="img", disable=not self.run.progress or None) as bar:
            for batch in batches:
                embeddings = self._forward(batch.images).cpu().numpy()
                if not np.isfinite(embeddings).all():  # never cached, never ranked: NaN sorts anywhere
                    raise NonFiniteEmbeddings(f"{self.model_id}: gives NaN or infinite embeddings (weights from a diverged"
                                              f" training run); retrain with a lower --lr")
                for index, embedding in zip(batch.indices, embeddings):
                    results[hashes[index]] = embedding
                    cache_path = self._cache_path(hashes[index])
                    if cache_path is not None:
                        write_cache_entry(cache_path, functools.partial(save_npy, embedding))
                bar.update(len(batch.indices))
        return results
