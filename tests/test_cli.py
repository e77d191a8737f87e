"""The command line end to end: outputs, and one-line errors with no partial output files."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, SNOW
from spotmatch.data.tables import load_pairs
from spotmatch.global_embed.checkpoint import read_checkpoint
from spotmatch.global_embed.embed import EmbedConfig, Embedder

CLI = [sys.executable, "-c", "from spotmatch.cli import main; main()"]


def run_cli(*args, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture()
def pairs_csv(tmp_path, snow_subset_csv) -> Path:
    table = pd.read_csv(snow_subset_csv)
    names = table["filename"].tolist()
    pairs = pd.DataFrame({"row_id": [f"r{i}" for i in range(len(names) - 1)], "query_image": names[:-1], "gallery_image": names[1:]})
    (tmp_path / "images").symlink_to(SNOW / "images")
    pairs.to_csv(tmp_path / "test.csv", index=False)
    return tmp_path / "test.csv"


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_score_pairs_writes_one_row_per_pair(tmp_path, pairs_csv, tiny_checkpoint):
    out = tmp_path / "submission.csv"
    result = run_cli("score-pairs", pairs_csv, "--checkpoint", tiny_checkpoint, "--out", out, "--num-workers", "0",
                     "--cache-dir", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    submission = pd.read_csv(out)
    assert list(submission.columns) == ["row_id", "similarity"]
    assert submission["row_id"].tolist() == pd.read_csv(pairs_csv)["row_id"].tolist()
    assert submission["similarity"].between(0, 1).all()
    # Each row its own pair's score: uncalibrated, that is the cosine mapped onto [0, 1] (scoring.cosine_to_similarity).
    pairs = load_pairs(pairs_csv)
    embedder = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(num_workers=0, cache_dir=None, progress=False))
    query = embedder.embed([Path(p) for p in pairs["query_image_path"]])
    gallery = embedder.embed([Path(p) for p in pairs["gallery_image_path"]])
    expected = (np.einsum("ij,ij->i", query, gallery) + 1) / 2
    assert np.ptp(expected) > 1e-4  # an untrained model's scores still differ enough to tell the rows apart
    np.testing.assert_allclose(submission["similarity"], expected, rtol=0, atol=1e-5)
    n_images = len(pd.read_csv(pairs_csv)) + 1
    assert f"scored {n_images - 1} pairs over {n_images} distinct images" in result.stdout


def test_embed_writes_npz(tmp_path, snow_subset_csv, tiny_checkpoint):
    out = tmp_path / "emb.npz"
    result = run_cli("embed", snow_subset_csv, "--checkpoint", tiny_checkpoint, "--out", out, "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    saved = np.load(out)
    names = pd.read_csv(snow_subset_csv)["filename"].tolist()
    assert saved["embeddings"].shape == (len(names), 64)
    assert [Path(p).name for p in saved["paths"]] == names and all(Path(p).is_file() for p in saved["paths"])
    # Row i must be the embedding of paths[i]: a reader joins the two by position.
    embedder = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(num_workers=0, cache_dir=None, progress=False))
    np.testing.assert_allclose(saved["embeddings"], embedder.embed([Path(p) for p in saved["paths"]]), rtol=0, atol=1e-5)

    photos = tmp_path / "photos"  # a folder named relative to the working directory: stored absolute, as a CSV's rows
    photos.mkdir()
    for name in pd.read_csv(snow_subset_csv)["filename"].head(3):
        (photos / name).symlink_to(SNOW / "images" / name)
    result = run_cli("embed", "photos", "--checkpoint", tiny_checkpoint, "--out", "folder.npz", "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [Path(p).is_absolute() and Path(p).is_file() for p in np.load(tmp_path / "folder.npz")["paths"]] == [True] * 3


def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, pairs_csv, tiny_checkpoint):
    out = tmp_path / "submission.csv"
    out.write_text("previous,content\n")  # an earlier good file must survive a failed run untouched
    pairs = pd.read_csv(pairs_csv)

    missing = pairs.copy()
    missing.loc[3, "gallery_image"] = "no_such_frame.jpg"
    missing.to_csv(tmp_path / "missing.csv", index=False)
    assert_one_line_error(run_cli("score-pairs", tmp_path / "missing.csv", "--checkpoint", tiny_checkpoint, "--out", out),
                          "no_such_frame.jpg not found", "missing.csv")

    broken = tmp_path / "images_broken"
    broken.mkdir()
    for name in set(pairs["query_image"]) | set(pairs["gallery_image"]):
        (broken / name).symlink_to(SNOW / "images" / name)
    victim = pairs["gallery_image"].iloc[5]
    (broken / victim).unlink()
    (broken / victim).write_bytes((SNOW / "images" / victim).read_bytes()[:4000])
    assert_one_line_error(run_cli("score-pairs", pairs_csv, "--images", broken, "--checkpoint", tiny_checkpoint,
                                  "--out", out, "--cache-dir", ""), f"{victim}: cannot decode image")

    pairs.rename(columns={"gallery_image": "gallery"}).to_csv(tmp_path / "cols.csv", index=False)
    assert_one_line_error(run_cli("score-pairs", tmp_path / "cols.csv", "--checkpoint", tiny_checkpoint, "--out", out),
                          "missing column(s) gallery_image")

    pairs.assign(row_id="same").to_csv(tmp_path / "dup.csv", index=False)
    assert_one_line_error(run_cli("score-pairs", tmp_path / "dup.csv", "--checkpoint", tiny_checkpoint, "--out", out),
                          "row_id 'same' appears more than once")

    weights = tmp_path / "weights.pth"
    import timm
    import torch

    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    assert_one_line_error(run_cli("score-pairs", pairs_csv, "--checkpoint", weights, "--out", out),
                          "not a spotmatch embedder checkpoint")
    edited = torch.load(tiny_checkpoint, weights_only=True)
    del edited["model"]
    torch.save(edited, tmp_path / "edited.pt")
    assert_one_line_error(run_cli("score-pairs", pairs_csv, "--checkpoint", tmp_path / "edited.pt", "--out", out),
                          "edited.pt: an embedder checkpoint without its model")

    folder_named = pairs.copy()
    folder_named.loc[2, "query_image"] = "."  # the image folder itself, named as a photo
    folder_named.to_csv(tmp_path / "folder.csv", index=False)
    assert_one_line_error(run_cli("score-pairs", tmp_path / "folder.csv", "--checkpoint", tiny_checkpoint, "--out", out),
                          "is a folder, not an image")
    (tmp_path / "zero.csv").write_bytes(b"")
    assert_one_line_error(run_cli("embed", tmp_path / "zero.csv", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "e.npz"),
                          "zero.csv: not a readable CSV")
    photo = SNOW / "images" / pairs["query_image"].iloc[0]
    assert_one_line_error(run_cli("explain", photo, photo, "--out", tmp_path / "match.jpg"), "end --out in .png")
    assert_one_line_error(run_cli("explain", photo, photo, "--out", tmp_path / "match.png", "--global-rank", "3"),
                          "--global-rank sets the place the fused probability is computed at: pass --fusion")

    assert out.read_text() == "previous,content\n"
    assert not list(tmp_path.glob(".submission.csv.*"))  # no temporary file left behind

    # An output that would replace an input, or land where it cannot, is refused before any work.
    before = pairs_csv.read_bytes()
    assert_one_line_error(run_cli("score-pairs", pairs_csv, "--checkpoint", tiny_checkpoint, "--out", pairs_csv),
                          f"--out {pairs_csv}: is also read by this command")
    assert pairs_csv.read_bytes() == before
    assert_one_line_error(run_cli("score-pairs", pairs_csv, "--checkpoint", tiny_checkpoint, "--out", out, "--evidence-out", out),
                          "another output of this command goes there too")
    assert_one_line_error(run_cli("score-pairs", pairs_csv, "--checkpoint", tiny_checkpoint, "--out", tmp_path),
                          "is a folder; name a file")
    assert_one_line_error(run_cli("score-pairs", pairs_csv, "--checkpoint", tiny_checkpoint, "--device", "bogus", "--out", out),
                          "--device bogus: not a device torch knows")
    # Settings that act only with a calibration file would otherwise be ignored without a word.
    assert_one_line_error(run_cli("score-pairs", pairs_csv, "--checkpoint", tiny_checkpoint, "--top-k", "5", "--out", out),
                          "--top-k and --shortlist-first set the local re-scoring")
    (tmp_path / "fusion.json").write_text("{}")
    assert_one_line_error(run_cli("score-pairs", pairs_csv, "--checkpoint", tiny_checkpoint, "--fusion", tmp_path / "fusion.json",
                                  "--flip-tta", "--out", out), "fit on embeddings without --flip-tta")
    assert out.read_text() == "previous,content\n"
    # evaluate's table over one of the photos it ranks
    photo_copy = tmp_path / "photos"
    photo_copy.mkdir()
    labels = pd.read_csv(SNOW / "labels.csv").head(6)
    for name in labels["filename"]:
        (photo_copy / name).write_bytes((SNOW / "images" / name).read_bytes())
    labels.to_csv(photo_copy / "labels.csv", index=False)
    victim = photo_copy / labels["filename"].iloc[0]
    before = victim.read_bytes()
    assert_one_line_error(run_cli("evaluate", "--data", photo_copy / "labels.csv", "--checkpoint", tiny_checkpoint, "--out", victim),
                          "is also read by this command")
    assert victim.read_bytes() == before


def _self_signalling_command(stop: str, out: Path) -> str:
    """A stand-in command that writes `out` through `atomic_path`, signals itself half way, then would finish."""
    return ("import os, signal, sys, time\n"
            "from spotmatch.cli import app, main\n"
            "from spotmatch.io import atomic_path\n"
            "@app.command('wait')\n"
            "def wait():\n"
            f"    with atomic_path({str(out)!r}) as tmp:\n"
            "        tmp.write_text('half')\n"
            f"        os.kill(os.getpid(), signal.{stop})\n"
            "        time.sleep(2)\n"
            "        tmp.write_text('whole')\n"
            "sys.argv = ['spotmatch', 'wait']\n"
            "main()\n")


def at_a_terminal() -> None:
    """A child's signals as an interactive terminal leaves them: a suite run in the background (`&`, `nohup`) passes
    its children SIGINT and SIGHUP ignored, which the command rightly respects, and then no signal would stop them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_ctrl_c_is_one_line_and_exit_status_130(stop, tmp_path):
    """The handler `main` installs, end to end in a real process (a stand-in command interrupts itself); `kill`
    (SIGTERM) and a dropped terminal (SIGHUP) end a run as Ctrl-C does, so its temporary files are removed too."""
    out = tmp_path / "out.txt"
    result = subprocess.run([sys.executable, "-c", _self_signalling_command(stop, out)], capture_output=True, text=True,
                            cwd=REPO, timeout=120, preexec_fn=at_a_terminal)
    assert result.returncode == 130
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("interrupted: output files")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its hidden temporary file


def test_a_hung_up_terminal_still_ends_the_run_as_interrupted(tmp_path):
    """After a hang-up the terminal takes no more output: the one line cannot be written, and that must not turn the
    interruption into an I/O error blamed on the output file."""
    import os

    out = tmp_path / "out.txt"
    read_end, write_end = os.pipe()
    os.close(read_end)  # nothing reads the command's stderr any more: writing to it fails, as to a dead terminal
    try:
        result = subprocess.run([sys.executable, "-c", _self_signalling_command("SIGHUP", out)], stdout=subprocess.DEVNULL,
                                stderr=write_end, cwd=REPO, timeout=120, preexec_fn=at_a_terminal)
    finally:
        os.close(write_end)
    assert result.returncode == 130
    assert list(tmp_path.iterdir()) == []


def test_a_run_under_nohup_outlives_the_terminal(tmp_path):
    """`nohup` ignores SIGHUP so that a long `add` survives a dropped ssh session; the command must not undo that."""
    out = tmp_path / "out.txt"
    result = subprocess.run([sys.executable, "-c", _self_signalling_command("SIGHUP", out)], capture_output=True, text=True,
                            cwd=REPO, timeout=120, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "whole"


def test_ctrl_c_while_decoding_workers_start_is_still_one_line():
    """A terminal's Ctrl-C reaches the whole process group: here it arrives while a real loader starts its
    fork server (which imports torch for seconds first) and its worker processes. Neither may print a
    traceback of its own (the server used to, while importing, and so did a worker started as the main
    process exited)."""
    script = ("import os, signal, sys\n"
              "from pathlib import Path\n"
              "from spotmatch.cli import app, main\n"
              "from spotmatch.global_embed import loading\n"
              "from spotmatch.global_embed.model import EmbedderConfig\n"
              "import multiprocessing.process, threading\n"
              "start = multiprocessing.process.BaseProcess.start\n"
              "def interrupted_start(process):\n"  # the first worker's start also starts the fork server
              "    threading.Timer(0.3, os.killpg, (os.getpgrp(), signal.SIGINT)).start()\n"
              "    multiprocessing.process.BaseProcess.start = start\n"
              "    start(process)\n"
              "multiprocessing.process.BaseProcess.start = interrupted_start\n"
              "@app.command('decode')\n"
              "def decode():\n"
              f"    paths = sorted(Path({str(SNOW / 'images')!r}).iterdir())[:8]\n"
              "    for batch in loading.iterate_batches(loading.ImageTensorDataset(paths, EmbedderConfig(image_size=64)), 2, 2):\n"
              "        pass\n"
              "sys.argv = ['spotmatch', 'decode']\n"
              "main()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120,
                            start_new_session=True, preexec_fn=at_a_terminal)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("interrupted: output files")


def test_empty_dataset_and_unknown_split_column(tmp_path, snow_subset_csv, tiny_checkpoint):
    (tmp_path / "labels.csv").write_text("filename,identity\n")
    assert_one_line_error(run_cli("train", "--data", tmp_path / "labels.csv", "--out", tmp_path / "run", "--preset", "tiny"),
                          "no labelled images")
    assert_one_line_error(run_cli("train", "--data", snow_subset_csv, "--out", tmp_path / "run", "--preset", "tiny",
                                  "--split-by", "season"), "cannot split by 'season'")
    assert_one_line_error(run_cli("train", "--data", snow_subset_csv, "--out", tmp_path / "run", "--preset", "tiny",
                                  "--flank-classes"), "--flank-classes needs a side column")
    assert_one_line_error(run_cli("train", "--data", snow_subset_csv, "--out", tmp_path / "run", "--preset", "tiniest"),
                          "unknown preset 'tiniest'; choose one of: tiny (random-init")  # each preset says what it is for
    assert_one_line_error(run_cli("train", "--data", snow_subset_csv, "--out", tmp_path / "run", "--preset", "tiny",
                                  "--split-by", "encounter", "--select-view", "same flank"), "--select-view same flank: not a view")
    # Three cats split by identity hold one out: ranked against itself alone, every ranking is perfect (IB-mAP 1.000).
    assert_one_line_error(run_cli("train", "--data", snow_subset_csv, "--out", tmp_path / "run", "--preset", "tiny"),
                          "ranked against one animal only")
    assert_one_line_error(run_cli("train", "--data", snow_subset_csv, "--out", snow_subset_csv, "--preset", "tiny"),
                          f"--out {snow_subset_csv}: is a file, not a folder")
    assert not (tmp_path / "run" / "best.pt").exists()


def test_train_resume_and_evaluate(tmp_path, snow_subset_csv):
    run = tmp_path / "run"
    common = ["--data", snow_subset_csv, "--out", run, "--preset", "tiny", "--split-by", "encounter", "--num-workers", "0",
              "--select-view", "cross-station"]
    assert_one_line_error(run_cli("train", *common, "--epochs", "1", "--resume"), "last.pt: no run to resume here")
    assert_one_line_error(run_cli("train", *common, "--epochs", "1", "--lr", "nan"), "--lr nan: must be a number above 0")
    assert not run.exists()  # refused before the run folder is made
    first = run_cli("train", *common, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    assert "best validation IB-mAP (cross-station)" in first.stdout
    trained = (run / "best.pt").read_bytes()
    assert_one_line_error(run_cli("train", *common, "--epochs", "1"), "already holds a training run (best.pt, last.pt)")
    assert (run / "best.pt").read_bytes() == trained  # a run is never replaced unasked
    diverged = run_cli("train", *common[:2], "--out", tmp_path / "diverged", *common[4:], "--epochs", "1", "--lr", "1e30")
    assert_one_line_error(diverged, "training diverged in epoch 1", "lower --lr (now 1e+30)")
    assert not (tmp_path / "diverged" / "best.pt").exists()  # no NaN model saved as the best
    resumed = run_cli("train", *common, "--epochs", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_one_line_error(run_cli("train", *common, "--epochs", "3", "--lr", "0.1", "--resume"), "other settings (lr)")
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    split_before, best_before = (run / "split.csv").read_bytes(), (run / "best.pt").read_bytes()
    # Another split would move trained photos into validation; a finished run has nothing to go on with.
    assert_one_line_error(run_cli("train", *common, "--epochs", "3", "--seed", "5", "--resume"), "was split otherwise")
    assert_one_line_error(run_cli("train", *common, "--epochs", "2", "--resume"), "already trained 2 epochs; pass --epochs above 2")
    assert_one_line_error(run_cli("train", *common, "--epochs", "3", "--resume", "--overwrite"), "pass one of them")
    # An --overwrite refused for a bad setting keeps the run it would have replaced.
    assert_one_line_error(run_cli("train", *common, "--epochs", "1", "--overwrite", "--backbone", "not_a_model"), "not_a_model")
    assert (run / "split.csv").read_bytes() == split_before and (run / "best.pt").read_bytes() == best_before

    evaluation = run_cli("evaluate", "--data", snow_subset_csv, "--checkpoint", run / "best.pt", "--checkpoint",
                         run / "last.pt", "--num-workers", "0", "--out", tmp_path / "table.md")
    assert evaluation.returncode == 0, evaluation.stderr
    assert "the split stored in" in evaluation.stdout and "| all |" in evaluation.stdout
    table = (tmp_path / "table.md").read_text()
    assert "cross-station" in table and f"| {run / 'last.pt'} | {run / 'best.pt'} | all |" in table  # last.pt minus best.pt

    # --overwrite replaces the whole run: with nothing held out no epoch "improves", and the earlier run's
    # best.pt must not stay behind as the new run's.
    replaced = run_cli("train", *common[:6], "--epochs", "1", "--val-fraction", "0", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    epochs = [json.loads(line) for line in replaced.stdout.splitlines() if line.startswith("{")]  # strict JSON: NaN is null
    assert [epoch["val_ib_map"] for epoch in epochs] == [None]
    assert read_checkpoint(run / "best.pt")["split_config"]["val_fraction"] == 0
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1]


def test_competition_cut_outs_train_and_score_from_the_animal_alone(tmp_path, snow_subset_csv):
    """The Kaggle jaguar layout: RGBA cut-outs in one folder, `train.csv` (filename, ground_truth) and
    `test.csv` (row_id, query_image, gallery_image). What the alpha channel hides (black, or the scene
    the cut-out came from) must not move a single similarity."""
    import cv2
    from PIL import Image

    table = pd.read_csv(snow_subset_csv).groupby("identity").head(3)
    for hidden in ("black", "scene"):
        folder = tmp_path / hidden
        (folder / "train").mkdir(parents=True)
        for name in table["filename"]:
            rgb = np.asarray(Image.open(SNOW / "images" / name).convert("RGB").resize((320, 240)))
            alpha = np.zeros(rgb.shape[:2], np.uint8)
            cv2.ellipse(alpha, (160, 130), (110, 70), 0, 0, 360, 255, -1)
            pixels = np.where(alpha[..., None] > 0, rgb, 0) if hidden == "black" else rgb
            Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(folder / "train" / name.replace(".JPG", ".png"))
        names = [n.replace(".JPG", ".png") for n in table["filename"]]
        pd.DataFrame({"filename": names, "ground_truth": table["identity"]}).to_csv(folder / "train.csv", index=False)
        pairs = [(q, g) for q in names for g in names if q != g]
        pd.DataFrame({"row_id": range(len(pairs)), "query_image": [q for q, _ in pairs], "gallery_image": [g for _, g in pairs]}).to_csv(
            folder / "test.csv", index=False)

    # One model, trained on the black cut-outs, scores both folders.
    trained = run_cli("train", "--data", tmp_path / "black" / "train.csv", "--images", tmp_path / "black" / "train",
                      "--out", tmp_path / "run", "--preset", "tiny", "--epochs", "1", "--val-fraction", "0")
    assert trained.returncode == 0, trained.stderr
    submissions = {}
    for hidden in ("black", "scene"):
        out = tmp_path / hidden / "submission.csv"
        scored = run_cli("score-pairs", tmp_path / hidden / "test.csv", "--images", tmp_path / hidden / "train",
                         "--checkpoint", tmp_path / "run" / "best.pt", "--out", out, "--cache-dir", tmp_path / hidden / "cache")
        assert scored.returncode == 0, scored.stderr
        submissions[hidden] = pd.read_csv(out)
    black, scene = submissions["black"], submissions["scene"]
    assert black["row_id"].tolist() == list(range(len(black))) and black["similarity"].between(0, 1).all()
    np.testing.assert_allclose(scene["similarity"], black["similarity"], atol=1e-6)


def test_demo_runs_the_whole_chain_on_its_held_out_encounters(tmp_path, snow_subset_csv):
    """The README's main job, on a subset with the tiny preset: train, calibrate the fusion on the held-out
    encounters, and score every held-out pair of test.csv through the engine."""
    from spotmatch.data.tables import load_pairs
    from spotmatch.engine import demo
    from spotmatch.engine.scoring import cosine_to_similarity, global_pair_scores
    from spotmatch.fusion.calibration import FusionModel
    from spotmatch.global_embed.embed import EmbedConfig, Embedder

    result = demo.main(snow_subset_csv, tmp_path / "demo", preset="tiny", device="cpu")
    pairs = pd.read_csv(tmp_path / "demo" / "test.csv")
    submission = pd.read_csv(result.submission)
    assert submission["row_id"].tolist() == pairs["row_id"].tolist() and submission["similarity"].between(0, 1).all()
    # test.csv and the calibration rank the same held-out queries against the same gallery: two code paths, one figure.
    trained = next(name for name in result.global_embedding if "trained" in name and "untrained" not in name)
    assert result.engine["global only"]["all"]["ib_map"] == pytest.approx(result.global_embedding[trained]["all"]["ib_map"])
    assert {"fused", "global only"} <= set(result.engine) and any(name.startswith("local only") for name in result.engine)
    # The submission holds the engine's calibrated probabilities, not the cosine mapped to [0, 1].
    fusion = FusionModel.load(tmp_path / "demo" / "fusion.json")
    embedder = Embedder.from_checkpoint(tmp_path / "demo" / "best.pt", EmbedConfig(device="cpu", cache_dir=str(tmp_path / "demo" / "cache")))
    cosine = global_pair_scores(load_pairs(tmp_path / "demo" / "test.csv", SNOW / "images"), embedder)["cosine"].to_numpy()
    assert fusion.shortlist_k == 20 and not np.allclose(submission["similarity"], cosine_to_similarity(cosine), atol=1e-3)
    assert "fused" in result.calibration_report.read_text()


def test_the_demo_never_trains_over_a_folder_it_did_not_make_and_refuses_data_it_cannot_use(tmp_path, snow_subset_csv):
    from spotmatch.engine import demo
    from spotmatch.errors import SpotmatchError

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"a model someone trained")
    with pytest.raises(SpotmatchError, match="holds files the demo did not make"):
        demo.main(snow_subset_csv, run, preset="tiny", device="cpu")
    assert (run / "best.pt").read_bytes() == b"a model someone trained"
    with pytest.raises(SpotmatchError, match="--preset bogus: unknown; choose one of tiny"):
        demo.main(snow_subset_csv, tmp_path / "demo", preset="bogus")
    one_each = pd.read_csv(snow_subset_csv).drop_duplicates("identity")  # nothing of a held-out animal left to train on
    one_each.to_csv(snow_subset_csv.parent / "one_each.csv", index=False)
    with pytest.raises(SpotmatchError, match="one_each.csv: no held-out photo .* has a photo of its animal left to train on"):
        demo.main(snow_subset_csv.parent / "one_each.csv", tmp_path / "demo", preset="tiny", device="cpu")
    assert not (tmp_path / "demo").exists()


def test_a_full_disk_is_one_line_and_a_cache_that_cannot_be_written_is_skipped(tmp_path, snow_subset_csv):
    """A file-size limit stands in for a full disk (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    import resource

    from spotmatch.io import write_cache_entry

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    labels = pd.read_csv(snow_subset_csv)
    pairs = pd.DataFrame({"row_id": range(200), "query_image": labels["filename"].iloc[0], "gallery_image": labels["filename"].iloc[1]})
    pairs.to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "images").symlink_to(SNOW / "images")
    result = subprocess.run([*CLI, "match", str(tmp_path / "test.csv"), "--top-k", "0", "--out", str(tmp_path / "out.csv"),
                             "--cache-dir", ""], capture_output=True, text=True, cwd=REPO, timeout=600, preexec_fn=small_files)
    assert_one_line_error(result, f"{tmp_path / 'out.csv'}: cannot be written (File too large); make room")
    assert not (tmp_path / "out.csv").exists() and not list(tmp_path.glob(".out.csv.*"))

    (tmp_path / "a-file").write_text("")
    assert write_cache_entry(tmp_path / "a-file" / "entry.npy", lambda tmp: tmp.write_bytes(b"x")) is False


def test_a_photo_of_over_89_megapixels_is_embedded_without_a_library_warning(tmp_path, tiny_checkpoint):
    """PIL's DecompressionBombWarning (two lines into site-packages) is not ours to print, in this process or in
    its decoding workers."""
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.new("L", (11000, 11000)).save(tmp_path / "photos" / "large.png")  # 121 MP
    embedded = run_cli("embed", tmp_path / "photos", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "e.npz",
                       "--cache-dir", "", "--num-workers", "1")
    assert embedded.returncode == 0 and "Warning" not in embedded.stderr, embedded.stderr


def test_every_file_the_package_reads_besides_its_modules_is_shipped():
    """An editable install reads the source tree, so nothing else would notice a page or asset left out of the
    wheel: `serve` answered its own page with an error 500 when installed from one."""
    import fnmatch
    import tomllib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["spotmatch"]
    package = REPO / "spotmatch"
    assets = [path.relative_to(package).as_posix() for path in package.rglob("*")
              if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts]
    assert "web/static/index.html" in assets
    assert [asset for asset in assets if not any(fnmatch.fnmatch(asset, pattern) for pattern in package_data)] == []


def test_version_and_a_missing_ray_are_one_line(monkeypatch):
    import importlib.util
    import tomllib

    from typer.testing import CliRunner

    from spotmatch.cli import app
    from spotmatch.cli.global_cmds import check_backend
    from spotmatch.errors import SpotmatchError

    result = CliRunner().invoke(app, ["--version"])
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert result.exit_code == 0 and result.output.strip() == f"spotmatch {declared}"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "ray" else real_find_spec(name, *args))
    with pytest.raises(SpotmatchError, match=r"--backend ray: Ray is not installed; pip install 'spotmatch\[ray\]'"):
        check_backend("ray")
    check_backend("local")


def test_an_output_through_a_link_or_into_a_stream_is_written_there_and_not_replaced(tmp_path):
    """The atomic rename once replaced whatever stood at `--out`: a link lost its link (its file kept the old
    content), a named pipe became a file nobody read, and as root `--out /dev/null` turned the machine's /dev/null
    into a plain file. A stream the shell appends to keeps what it held."""
    import threading

    from spotmatch.io import check_output, write_csv_atomic, write_text_atomic

    (tmp_path / "kept.csv").write_text("old\n")
    (tmp_path / "link.csv").symlink_to("kept.csv")
    write_text_atomic("new\n", tmp_path / "link.csv", follow=True)
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "kept.csv").read_text() == "new\n"

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()))
    reader.start()
    assert check_output(pipe) == pipe
    write_csv_atomic(pd.DataFrame({"row_id": [1], "similarity": [0.5]}), pipe, follow=True)
    reader.join(timeout=30)
    assert received == ["row_id,similarity\n1,0.5\n"] and stat.S_ISFIFO(pipe.stat().st_mode)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept.csv", "link.csv", "pipe"]  # no temporary left

    rounds = tmp_path / "rounds.csv"  # `spotmatch ... --out /dev/stdout >> rounds.csv`
    rounds.write_text("row_id,similarity\n0,0.25\n")
    with open(rounds, "ab") as appended:
        subprocess.run([sys.executable, "-c", "import pandas as pd; from spotmatch.io import write_csv_atomic;"
                        " write_csv_atomic(pd.DataFrame({'row_id': [1], 'similarity': [0.5]}), '/dev/stdout', follow=True)"],
                       stdout=appended, check=True, cwd=REPO, timeout=120)
    assert rounds.read_text() == "row_id,similarity\n0,0.25\nrow_id,similarity\n1,0.5\n"


def test_a_link_or_pipe_planted_in_a_cache_folder_is_replaced_not_followed(tmp_path):
    """Caches, uploads and drawings live in folders a team may share: a link there must not lead a write to another
    file, nor a named pipe hang it; only an output the user named is followed."""
    from spotmatch.io import write_cache_entry

    cache, outside = tmp_path / "cache", tmp_path / "outside"
    cache.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me")
    (cache / "entry.npy").symlink_to(outside / "victim.txt")
    os.mkfifo(cache / "other.npy")
    for name in ("entry.npy", "other.npy"):
        assert write_cache_entry(cache / name, lambda tmp: tmp.write_bytes(b"cached"))
        assert (cache / name).is_file() and not (cache / name).is_symlink() and (cache / name).read_bytes() == b"cached"
    assert (outside / "victim.txt").read_text() == "keep me"
