"""FAISS top-K retrieval, with the index type chosen by gallery size behind one function."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spotmatch.errors import SpotmatchError


@dataclass
class IndexConfig:
    kind: str = "auto"  # "flat" (exact), "hnsw", "ivf", or "auto": exact below `exact_limit`
    exact_limit: int = 50_000
    hnsw_neighbours: int = 32
    ivf_lists: int = 0  # 0: about 4·sqrt(n)
    ivf_probe: int = 16


def build_index(gallery_embeddings: np.ndarray, conf: IndexConfig | None = None):
    """Inner-product index over L2-normalised embeddings (inner product = cosine)."""
    import faiss  # heavy import kept off the CLI's start-up path

    conf = conf or IndexConfig()
    gallery_embeddings = np.ascontiguousarray(gallery_embeddings, dtype=np.float32)
    if gallery_embeddings.ndim != 2 or len(gallery_embeddings) == 0:
        raise SpotmatchError("the gallery is empty; add gallery images before searching")
    n, dim = gallery_embeddings.shape
    kind = conf.kind if conf.kind != "auto" else ("flat" if n <= conf.exact_limit else "hnsw")
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, conf.hnsw_neighbours, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf":
        lists = conf.ivf_lists or max(1, min(n // 39, int(4 * np.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(gallery_embeddings)
        index.nprobe = min(conf.ivf_probe, lists)
    else:
        raise SpotmatchError(f"unknown index kind {kind!r}; use auto, flat, hnsw or ivf")
    index.add(gallery_embeddings)
    return index


def search(index, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, gallery indices), each (n_queries, k), best first; -1 where fewer than k exist."""
    query_embeddings = np.ascontiguousarray(query_embeddings, dtype=np.float32)
    if query_embeddings.shape[1] != index.d:
        raise SpotmatchError(
            f"query embeddings have {query_embeddings.shape[1]} dimensions but the gallery index has {index.d};"
            f" embed both with the same model"
        )
    return index.search(query_embeddings, min(k, index.ntotal))
