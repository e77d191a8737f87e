"""Image loading, tables and splits on real images."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import NYALA, SNOW
from spotmatch.catalogue.service import sources_from_csv
from spotmatch.data.images import file_sha256, load_image, mask_bbox
from spotmatch.data.splits import SplitConfig, perceptual_hashes, split_dataset
from spotmatch.data.tables import load_dataset, load_pairs
from spotmatch.errors import SpotmatchError

SNOW_IMAGE = SNOW / "images" / "01__Station04__Camera2__2012-7-22__1-53-20_0.JPG"


def test_exif_orientation_is_applied(tmp_path):
    source = Image.open(SNOW_IMAGE)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated_file = tmp_path / "rotated.jpg"
    source.save(rotated_file, exif=exif)
    record = load_image(rotated_file)
    assert record.size == (source.height, source.width)
    # The stored pixels turned a quarter clockwise: a turn the other way has the same size but other pixels.
    stored = np.asarray(Image.open(rotated_file).convert("RGB"))
    np.testing.assert_array_equal(record.rgb, np.rot90(stored, k=-1))


def test_capture_time_is_when_the_shutter_fired_never_the_files_last_edit(tmp_path):
    """DateTimeOriginal, else DateTimeDigitized; DateTime (0x0132) is when a resize tool or editor last wrote the
    file, and EXIF's "not set" (zeros, blanks) is no date: both read as date unknown."""
    small = Image.open(SNOW_IMAGE).reduce(8)

    def captured(ifd0: dict, exif_ifd: dict) -> str | None:
        exif = Image.Exif()
        exif.update(ifd0)
        exif.get_ifd(0x8769).update(exif_ifd)  # the Exif IFD, where the capture times live
        small.save(tmp_path / "photo.jpg", exif=exif)
        return load_image(tmp_path / "photo.jpg").captured_at

    resized = {0x0132: "2020:03:01 09:00:00"}  # DateTime: the day the photos were shrunk for e-mail
    assert captured(resized, {}) is None
    assert captured(resized, {0x9004: "2012:07:22 01:53:20"}) == "2012:07:22 01:53:20"  # DateTimeDigitized
    assert captured(resized, {0x9003: "2012:07:22 01:53:20", 0x9004: "2012:07:22 01:53:21"}) == "2012:07:22 01:53:20"
    for unset in ("0000:00:00 00:00:00", "    :  :     :  :  "):
        assert captured(resized, {0x9003: unset}) is None
        assert captured({}, {0x9003: unset, 0x9004: "2012:07:22 01:53:20"}) == "2012:07:22 01:53:20"


def test_rgba_alpha_becomes_the_mask(tmp_path):
    rgb = np.asarray(Image.open(SNOW_IMAGE).convert("RGB").resize((200, 150)))
    alpha = np.zeros((150, 200), np.uint8)
    alpha[30:100, 50:160] = 255
    path = tmp_path / "cutout.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    record = load_image(path)
    assert record.rgb.shape == (150, 200, 3)
    assert record.mask is not None and record.mask.sum() == 70 * 110
    assert mask_bbox(record.mask) == (50, 30, 160, 100)
    np.testing.assert_array_equal(record.rgb, rgb)


def test_opaque_alpha_is_not_a_mask(tmp_path):
    path = tmp_path / "opaque.png"
    Image.open(SNOW_IMAGE).convert("RGBA").resize((64, 48)).save(path)
    assert load_image(path).mask is None


def test_a_png_transparent_colour_becomes_the_mask(tmp_path):
    """A tRNS chunk (one colour marked transparent) in greyscale and RGB PNGs, as in palette ones."""
    rgb = np.full((40, 60, 3), 200, np.uint8)
    rgb[10:30, 10:50] = (10, 20, 30)
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=(200, 200, 200))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png", transparency=200)
    for name in ("rgb.png", "grey.png"):
        mask = load_image(tmp_path / name).mask
        assert mask is not None and mask.sum() == 20 * 40 and mask[10:30, 10:50].all()


def test_an_alpha_that_hides_everything_is_refused_in_one_line(tmp_path):
    """A cut-out of nothing: the embedder would see the hidden frame and the keypoint stage nothing."""
    path = tmp_path / "empty cutout.png"
    rgba = np.asarray(Image.open(SNOW_IMAGE).convert("RGBA").resize((64, 48))).copy()
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(path)
    with pytest.raises(SpotmatchError, match="empty cutout.png: its alpha channel hides every pixel") as error:
        load_image(path)
    assert "\n" not in str(error.value)


def test_greyscale_and_16_bit_infrared_become_rgb(tmp_path):
    grey = np.asarray(Image.open(SNOW_IMAGE).convert("L").resize((120, 90)))
    Image.fromarray(grey).save(tmp_path / "grey.png")
    record = load_image(tmp_path / "grey.png")
    assert record.rgb.shape == (90, 120, 3) and record.greyscale
    Image.fromarray(grey.astype(np.uint16) * 200).save(tmp_path / "ir16.png")
    ir = load_image(tmp_path / "ir16.png")
    assert ir.rgb.dtype == np.uint8 and ir.rgb.shape == (90, 120, 3)
    # Stretched over the 8-bit range, not clipped at 255: clipping would turn nearly every pixel white.
    assert np.corrcoef(ir.rgb[..., 0].ravel(), grey.ravel())[0, 1] > 0.98
    assert ir.rgb.min() <= 5 and ir.rgb.max() >= 250


def test_near_duplicate_hashes_see_the_pixels_every_stage_sees(tmp_path):
    """16-bit frames of different scenes are no twins (PIL's own 8-bit conversion made them one grey), and a
    copy stored sideways with an EXIF orientation is its upright original's twin."""
    frames = sorted((SNOW / "images").glob("*.JPG"))[::60][:3]
    for i, frame in enumerate(frames):
        grey = np.asarray(Image.open(frame).convert("L").resize((320, 240))).astype(np.uint16)
        Image.fromarray(grey * 4 + 2000).save(tmp_path / f"ir16-{i}.png")
    hashes = perceptual_hashes([tmp_path / f"ir16-{i}.png" for i in range(3)])
    assert len(set(hashes.tolist())) == 3

    upright = Image.open(SNOW_IMAGE)
    upright.save(tmp_path / "upright.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.jpg", exif=exif)
    original, copy = perceptual_hashes([tmp_path / "upright.jpg", tmp_path / "sideways.jpg"])
    assert bin(int(original) ^ int(copy)).count("1") <= SplitConfig.near_duplicate_distance


def test_tables_name_linked_photos_as_given_and_point_at_the_right_folder(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "link.jpg").symlink_to(SNOW_IMAGE)
    (tmp_path / "data" / "images" / "loop1.jpg").symlink_to("loop2.jpg")
    (tmp_path / "data" / "images" / "loop2.jpg").symlink_to("loop1.jpg")
    (tmp_path / "data" / "labels.csv").write_text("filename,identity\nlink.jpg,Cat1\n")
    assert load_dataset(tmp_path / "data" / "labels.csv").paths == [tmp_path / "data" / "images" / "link.jpg"]
    (tmp_path / "data" / "loop.csv").write_text("filename,identity\nloop1.jpg,Cat1\n")
    with pytest.raises(SpotmatchError, match="loop.csv: image .*loop1.jpg not found"):
        load_dataset(tmp_path / "data" / "loop.csv")
    # A name typed with é as one character finds the file saved with e plus an accent (as macOS stores names).
    (tmp_path / "data" / "images" / "cafe\u0301.jpg").symlink_to(SNOW_IMAGE)
    (tmp_path / "data" / "accent.csv").write_text("filename,identity\ncaf\u00e9.jpg,Cat1\n", encoding="utf-8")
    assert load_dataset(tmp_path / "data" / "accent.csv").paths == [tmp_path / "data" / "images" / "cafe\u0301.jpg"]
    # ... yet a link and the file it leads to are one photo, listed twice.
    (tmp_path / "data" / "twice.csv").write_text(f"filename,identity\nlink.jpg,Cat1\n{SNOW_IMAGE},Cat1\n")
    with pytest.raises(SpotmatchError, match="link.jpg is listed more than once"):
        load_dataset(tmp_path / "data" / "twice.csv")
    # A name with its folder, beside a default images/ folder: --images names the folder the names start from.
    (tmp_path / "data" / "foldered.csv").write_text("filename,identity\nimages/link.jpg,Cat1\n")
    with pytest.raises(SpotmatchError, match=f"not found; it is in {tmp_path / 'data'}: pass --images {tmp_path / 'data'}$"):
        load_dataset(tmp_path / "data" / "foldered.csv")


def test_truncated_image_names_the_file(tmp_path):
    data = SNOW_IMAGE.read_bytes()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(SpotmatchError, match="broken.jpg: cannot decode image") as error:
        load_image(broken)
    assert "\n" not in str(error.value)
    with pytest.raises(SpotmatchError, match="missing.jpg: image file not found"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(SpotmatchError, match="folder.jpg: is a folder, not an image file"):
        file_sha256(tmp_path / "folder.jpg")
    # The near-duplicate hashing of a split decodes too: the same one line, not PIL's exception.
    with pytest.raises(SpotmatchError, match="broken.jpg: cannot decode image"):
        perceptual_hashes([SNOW_IMAGE, broken])
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(SpotmatchError, match=r"text.jpg: cannot decode image \(not an image format PIL reads\)"):
        load_image(tmp_path / "text.jpg")


def test_kaggle_train_csv_and_bad_tables(tmp_path):
    (tmp_path / "images").symlink_to(SNOW / "images")
    pd.DataFrame({"filename": [SNOW_IMAGE.name], "ground_truth": ["Cat21"]}).to_csv(tmp_path / "train.csv", index=False)
    dataset = load_dataset(tmp_path / "train.csv")
    assert dataset.identities == ["Cat21"] and dataset.paths[0].is_file()

    pd.DataFrame({"filename": [SNOW_IMAGE.name], "who": ["Cat21"]}).to_csv(tmp_path / "nolabel.csv", index=False)
    with pytest.raises(SpotmatchError, match="nolabel.csv: no identity column"):
        load_dataset(tmp_path / "nolabel.csv")

    pd.DataFrame({"filename": [], "identity": []}).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(SpotmatchError, match="empty.csv: no labelled images"):
        load_dataset(tmp_path / "empty.csv")

    pd.DataFrame({"filename": ["nope.jpg"], "identity": ["Cat1"]}).to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises(SpotmatchError, match="nope.jpg not found"):
        load_dataset(tmp_path / "missing.csv")

    pd.DataFrame({"filename": [SNOW_IMAGE.name] * 2, "identity": ["Cat21", "Cat2"]}).to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(SpotmatchError, match=f"twice.csv: {SNOW_IMAGE.name} is labelled as different individuals on lines 2, 3"):
        load_dataset(tmp_path / "twice.csv")
    pd.DataFrame({"filename": [SNOW_IMAGE.name] * 2, "identity": ["Cat21", " Cat21"]}).to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(SpotmatchError, match=f"twice.csv: {SNOW_IMAGE.name} is listed more than once \\(lines 2, 3\\)"):
        load_dataset(tmp_path / "twice.csv")
    pd.DataFrame({"filename": [SNOW_IMAGE.name, f"./{SNOW_IMAGE.name}"], "identity": ["Cat21"] * 2}).to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(SpotmatchError, match=f"listed more than once \\(lines 2, 3, written {SNOW_IMAGE.name} and ./{SNOW_IMAGE.name}\\)"):
        load_dataset(tmp_path / "twice.csv")  # one photo in two spellings: its own match in every evaluation

    # Kaggle's spelling, cells padded after the comma, a blank label named by its own column
    (tmp_path / "train.csv").write_text(f"filename, ground_truth\n {SNOW_IMAGE.name}, Cat21\n")
    assert load_dataset(tmp_path / "train.csv").table[["filename", "identity"]].values.tolist() == [[SNOW_IMAGE.name, "Cat21"]]
    (tmp_path / "train.csv").write_text(f"filename,ground_truth\n{SNOW_IMAGE.name},\n")
    with pytest.raises(SpotmatchError, match="train.csv: empty ground_truth on line 2"):
        load_dataset(tmp_path / "train.csv")
    (tmp_path / "semicolons.csv").write_text(f"filename;identity\n{SNOW_IMAGE.name};Cat21\n")
    with pytest.raises(SpotmatchError, match="semicolons.csv: its columns are separated by semicolons"):
        load_dataset(tmp_path / "semicolons.csv")
    with pytest.raises(SpotmatchError, match="semicolons.csv: its columns are separated by semicolons"):
        sources_from_csv(tmp_path / "semicolons.csv")  # `catalogue add` reads its tables the same way


def test_pairs_csv_checks(tmp_path):
    (tmp_path / "test").symlink_to(SNOW / "images")  # Kaggle's layout: test.csv beside test/
    good = pd.DataFrame({"row_id": [0, 1], "query_image": [SNOW_IMAGE.name] * 2, "gallery_image": [SNOW_IMAGE.name] * 2})
    good.to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(SpotmatchError, match=f"test.csv: image .* not found; it is in {tmp_path / 'test'}: pass --images"):
        load_pairs(tmp_path / "test.csv")
    (tmp_path / "test").rename(tmp_path / "images")
    assert len(load_pairs(tmp_path / "test.csv")) == 2
    beside = tmp_path / "beside"  # the photo beside the CSV, and an empty images/ folder that is looked in first
    (beside / "images").mkdir(parents=True)
    (beside / SNOW_IMAGE.name).symlink_to(SNOW_IMAGE)
    good.to_csv(beside / "test.csv", index=False)
    with pytest.raises(SpotmatchError, match=f"not found; it is in {beside}: pass --images {beside}"):
        load_pairs(beside / "test.csv")
    (tmp_path / "padded.csv").write_text(f"row_id, query_image, gallery_image\n7, {SNOW_IMAGE.name}, {SNOW_IMAGE.name}\n")
    assert load_pairs(tmp_path / "padded.csv")[["row_id", "query_image"]].values.tolist() == [["7", SNOW_IMAGE.name]]
    good.assign(row_id=[7, 7]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(SpotmatchError, match="row_id '7' appears more than once"):
        load_pairs(tmp_path / "dup.csv")
    good.drop(columns="gallery_image").to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(SpotmatchError, match="missing column\\(s\\) gallery_image"):
        load_pairs(tmp_path / "cols.csv")
    good.rename(columns={"row_id": "row_id ", "query_image": " query_image"}).to_csv(tmp_path / "spaces.csv", index=False)
    assert len(load_pairs(tmp_path / "spaces.csv")) == 2  # header padding, as spreadsheets write it
    good.assign(row_id=["", "1"]).to_csv(tmp_path / "norow.csv", index=False)
    with pytest.raises(SpotmatchError, match="norow.csv: empty row_id on line 2"):
        load_pairs(tmp_path / "norow.csv")
    # One field more on every row: pandas would take row_id as the index and read an image name as row_id.
    (tmp_path / "ragged.csv").write_text("row_id,query_image,gallery_image\n" + "".join(
        f"{n},{SNOW_IMAGE.name},{SNOW_IMAGE.name},{SNOW_IMAGE.name}\n" for n in range(2)))
    with pytest.raises(SpotmatchError, match=r"ragged.csv: every row has one field more than the header \(row_id, query_image"):
        load_pairs(tmp_path / "ragged.csv")
    (tmp_path / "latin1.csv").write_bytes("row_id,query_image,gallery_image\n1,caf\u00e9.jpg,b.jpg\n".encode("latin-1"))
    with pytest.raises(SpotmatchError, match=r"latin1.csv: not a readable CSV \(not UTF-8 text: byte 0xe9\); if it is a table saved in another encoding, save it as UTF-8"):
        load_pairs(tmp_path / "latin1.csv")


def test_encounter_split_keeps_encounters_whole_and_is_deterministic():
    dataset = load_dataset(SNOW / "labels.csv")
    conf = SplitConfig(by="encounter", val_fraction=0.3, seed=3)
    split = split_dataset(dataset, conf)
    sides = dataset.table.assign(split=split).groupby("encounter")["split"].nunique()
    assert (sides == 1).all()
    val_identities = set(dataset.table.loc[split == "val", "identity"])
    train_identities = set(dataset.table.loc[split == "train", "identity"])
    assert val_identities and val_identities <= train_identities  # closed set: every query has a gallery match
    pd.testing.assert_series_equal(split, split_dataset(dataset, conf))


def test_identity_split_is_disjoint():
    dataset = load_dataset(NYALA / "labels.csv")
    split = split_dataset(dataset, SplitConfig(by="identity", val_fraction=0.3, near_duplicate_distance=-1))
    val = set(dataset.table.loc[split == "val", "identity"])
    train = set(dataset.table.loc[split == "train", "identity"])
    assert not val & train and abs(len(val) - 0.3 * 179) <= 1

    # 1: every photo queried against every other, the open-set evaluation of a table the model never saw
    assert (split_dataset(dataset, SplitConfig(by="identity", val_fraction=1)) == "val").all()
    with pytest.raises(SpotmatchError, match="--val-fraction 1: .* with --split-by identity only"):
        SplitConfig(by="encounter", val_fraction=1)


def test_nyala_views_leave_out_each_photos_partner():
    """Nyala's photo_ids each hold a left and a right photo of one animal: the "other photo_id" view drops a query's
    partner and keeps its animal's other photos; the same flank drops the partner too, as it shows the other flank."""
    from spotmatch.evaluation.protocol import build_protocol

    dataset = load_dataset(NYALA / "labels.csv")
    split = split_dataset(dataset, SplitConfig(by="identity", val_fraction=0.3, near_duplicate_distance=-1))
    protocol = build_protocol(dataset.table, split, "identity")
    table = dataset.table
    photo, identity = table["photo_id"].to_numpy(), table["identity"].to_numpy()
    q, g = protocol.query_rows[:, None], protocol.gallery_rows[None, :]
    partner, same_animal = (photo[q] == photo[g]) & (q != g), identity[q] == identity[g]
    assert partner.sum() > 100 and (partner <= same_animal).all()  # the partners are matches the open set counts
    other_photo = protocol.views["other photo_id"]
    assert not (other_photo & partner).any() and ((other_photo | partner) == protocol.views["all"]).all()
    assert (other_photo & same_animal).sum() > 0
    assert not (protocol.views["same flank"] & partner).any()


def test_near_duplicates_never_straddle_the_split(tmp_path, snow_table):
    """A burst frame filed under another encounter is tied to its twin."""
    rows = snow_table[snow_table["identity"].isin(["Cat1"]) & (snow_table["unambiguous"] == "True")]
    encounters = sorted(rows["encounter"].unique())[:6]
    table = rows[rows["encounter"].isin(encounters)].groupby("encounter").head(2).copy()
    (tmp_path / "images").mkdir()
    for name in table["filename"]:
        (tmp_path / "images" / name).symlink_to(SNOW / "images" / name)
    twin = table.iloc[0].copy()
    twin["filename"], twin["encounter"] = "twin.jpg", encounters[-1]
    Image.open(SNOW / "images" / table.iloc[0]["filename"]).resize((800, 600)).save(tmp_path / "images" / "twin.jpg", quality=80)
    table = pd.concat([table, twin.to_frame().T])
    table.to_csv(tmp_path / "labels.csv", index=False)
    dataset = load_dataset(tmp_path / "labels.csv")
    for seed in range(6):
        split = split_dataset(dataset, SplitConfig(by="encounter", val_fraction=0.5, seed=seed))
        original = dataset.table["filename"] == table.iloc[0]["filename"]
        assert split[original].iloc[0] == split[dataset.table["filename"] == "twin.jpg"].iloc[0]


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o022, 0o644)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """A team's `umask 077` keeps exports of its camera-trap data private; atomic writes go through a temporary
    file that starts at 0600, so they must set the mode a plain open() would have."""
    import os

    from spotmatch.io import write_text_atomic

    previous = os.umask(umask)
    try:
        written = write_text_atomic("x", tmp_path / "export.md")
    finally:
        os.umask(previous)
    assert written.stat().st_mode & 0o777 == mode
