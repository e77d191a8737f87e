"""Dataset tables: an image folder plus a CSV of `filename, identity[, extra columns]`.

Also reads the Kaggle Jaguar Re-ID files: `train.csv` (`filename, ground_truth`) and `test.csv`
(`row_id, query_image, gallery_image`).
"""
from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from spotmatch.errors import SpotmatchError

# Other spellings of the identity column seen in public re-ID tables (Kaggle's jaguar set uses ground_truth).
IDENTITY_ALIASES = ("identity", "ground_truth", "individual", "label", "id")
FILENAME_ALIASES = ("filename", "file", "image", "path")
PAIR_COLUMNS = ("row_id", "query_image", "gallery_image")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
SIDES = ("left", "right")
_SIDE_WORDS = {"left": "left", "l": "left", "right": "right", "r": "right", "": None, "unknown": None, "na": None, "both": None}


def parse_side(value: str | None, where: str) -> str | None:
    """"left"/"right" (or l/r, any case); empty, "unknown", "na", "both": not known (None). Anything else is
    an error naming `where`: a wrong flank would hide the right animal (identify --side), make a class of
    its own (train --flank-classes) or leave a pair out of the same-flank view."""
    word = (value or "").strip().lower()
    if word not in _SIDE_WORDS:
        raise SpotmatchError(f"{where}: side {value!r} is not a flank; use left, right, or leave it empty")
    return _SIDE_WORDS[word]


@dataclass
class Dataset:
    """Labelled images: `table` has at least `filename` and `identity`; `path` holds absolute paths."""

    table: pd.DataFrame
    image_dir: Path
    csv_path: Path | None = None

    def __len__(self) -> int:
        return len(self.table)

    @property
    def paths(self) -> list[Path]:
        return [Path(p) for p in self.table["path"]]

    @property
    def identities(self) -> list[str]:
        return self.table["identity"].tolist()

    def subset(self, rows: pd.Series | list) -> "Dataset":
        return Dataset(self.table.loc[rows].reset_index(drop=True), self.image_dir, self.csv_path)


# What pandas raises for a file it cannot read as a CSV.
CSV_READ_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError)


def unreadable_csv(csv_path: Path, exc: Exception, fix: str) -> SpotmatchError:
    """The one-line error for a file pandas cannot read as a CSV; a table saved in another encoding (Latin-1,
    UTF-16: a spreadsheet's plain "CSV") is told how to save it."""
    if isinstance(exc, UnicodeDecodeError):
        return SpotmatchError(f"{csv_path}: not a readable CSV (not UTF-8 text: byte {exc.object[exc.start]:#04x}); if it is a table"
                              f" saved in another encoding, save it as UTF-8 (a spreadsheet's \"CSV UTF-8\"); else {fix}")
    return SpotmatchError(f"{csv_path}: not a readable CSV ({str(exc).splitlines()[0]}); {fix}")


def read_csv_table(csv_path: Path, nrows: int | None = None, fix: str = "check the file") -> pd.DataFrame:
    """Every cell as written (text, no NaN), or a one-line error ending in `fix` for a file that is no such table."""
    if not csv_path.is_file():
        raise SpotmatchError(f"{csv_path}: CSV file not found; pass the labels/pairs CSV path")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, nrows=nrows)
    except CSV_READ_ERRORS as exc:
        raise unreadable_csv(csv_path, exc, fix) from None
    if len(table.columns) == 1 and ";" in table.columns[0]:  # a spreadsheet's export in a comma-decimal locale
        raise SpotmatchError(f"{csv_path}: its columns are separated by semicolons ({table.columns[0]}); save it comma-separated")
    refuse_extra_field(table, csv_path)
    return table


def refuse_extra_field(table: pd.DataFrame, csv_path: Path) -> None:
    """Rows that all hold one field more than the header: pandas takes their first field as the index and
    shifts every column left (row_id would read an image name), without a word."""
    if not isinstance(table.index, pd.RangeIndex):
        raise SpotmatchError(f"{csv_path}: every row has one field more than the header ({', '.join(table.columns)}); add the"
                             f" missing column name to the header, or remove the extra field")


def is_pairs_table(csv_path: Path) -> bool:
    """A pairs CSV (`row_id, query_image, gallery_image`) rather than a labels table, told by its header."""
    return "query_image" in {c.strip() for c in read_csv_table(csv_path, nrows=0).columns}


def find_column(table: pd.DataFrame, aliases: tuple[str, ...]) -> str | None:
    """The table's column named by the first alias it has, in any case and spacing; None if it has none."""
    lower = {c.lower().strip(): c for c in table.columns}
    return next((lower[name] for name in aliases if name in lower), None)


def _pick_column(table: pd.DataFrame, aliases: tuple[str, ...], what: str, csv_path: Path) -> str:
    column = find_column(table, aliases)
    if column is not None:
        return column
    raise SpotmatchError(
        f"{csv_path}: no {what} column (expected one of {', '.join(aliases)}; found {', '.join(table.columns) or 'none'});"
        f" rename the column"
    )


def default_image_dir(csv_path: Path) -> Path:
    """`images/` beside the CSV when it exists, else the CSV's own folder (Kaggle's layout varies)."""
    candidate = csv_path.parent / "images"
    return candidate if candidate.is_dir() else csv_path.parent


def check_files_exist(paths: list[Path], source: Path | None, names: list[str] | None = None) -> None:
    """Refuse a table naming a file that is not there; `names`: each path as the table writes it (with any
    folders), to find the folder `--images` should name."""
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        first = paths[missing[0]]
        where = f"{source}: " if source else ""
        what = "is a folder, not an image" if first.is_dir() else "not found"
        more = f" and {len(missing) - 1} more missing" if len(missing) > 1 else ""
        holder = _folder_beside(source, names[missing[0]] if names else first.name) if source else None
        fix = f"it is in {holder}: pass --images {holder}" if holder else "check --images or the CSV's file names"
        raise SpotmatchError(f"{where}image {first} {what}{more}; {fix}")


def _folder_beside(csv_path: Path, name: str) -> Path | None:
    """The CSV's own folder or a folder next to it that holds `name` (Kaggle puts test.csv beside test/, train.csv
    beside train/; an `images/` folder beside the CSV is looked in by default, even where the photos sit beside the CSV).
    An absolute `name` is in no folder."""
    if not csv_path.parent.is_dir() or Path(name).is_absolute():
        return None
    folders = [csv_path.parent, *sorted(p for p in csv_path.parent.iterdir() if p.is_dir())]
    return next((folder for folder in folders if (folder / name).is_file()), None)


def absolute_path(path: Path) -> str:
    """Absolute and normalised (`./X.JPG` and `X.JPG` are one path), but a link keeps the name the table gave:
    results and errors name the user's file, and a link that loops is reported when read, in one line.
    Whether two paths are one photo is `same_file_key`'s question."""
    return os.path.abspath(path)


def on_disk_spelling(path: Path) -> Path:
    """`path`, or the same name in the other Unicode normal form where only that one is on disk: a name typed
    on one system (é as one character) and saved by another (e plus an accent, as macOS stores names) looks the
    same in every message, but is another file name."""
    if path.exists() or path.is_symlink():
        return path
    for form in ("NFC", "NFD"):
        candidate = Path(unicodedata.normalize(form, str(path)))
        if candidate != path and (candidate.exists() or candidate.is_symlink()):
            return candidate
    return path


def same_file_key(path: str | Path) -> str:
    """One key per file however it is reached, through links and linked folders too: what tells a photo listed
    twice, or a set that shares photos with another (never raises, even for a link that loops)."""
    return os.path.realpath(path)


def refuse_conflicting_labels(table: pd.DataFrame, filename_col: str, identity_col: str, csv_path: Path) -> None:
    """One photo under two names cannot be both animals: which is right is the team's call, not ours.
    Blank names (unlabelled rows) are not a conflict."""
    names = table[identity_col].str.strip()
    labelled = table[names != ""].assign(_name=names)
    names_per_file = labelled.groupby(filename_col)["_name"].nunique()
    if (names_per_file > 1).any():
        filename = names_per_file.index[names_per_file > 1][0]
        lines = ", ".join(str(i + 2) for i in labelled.index[labelled[filename_col] == filename])
        raise SpotmatchError(f"{csv_path}: {filename} is labelled as different individuals on lines {lines}; keep one label for it")


def photo_name(filename: str) -> str:
    """How a photo is known across tables (a checkpoint's split, its extra sets): its file name without folders,
    so that `X.JPG`, `./X.JPG` and `/data/images/X.JPG` in two tables are one photo."""
    return Path(filename).name


def refuse_repeated_rows(table: pd.DataFrame, csv_path: Path) -> None:
    """A photo listed twice would be its own match in every evaluation (and weigh twice in training). Known by
    the file its `path` reaches, so that two spellings of one file (`X.JPG`, `./X.JPG`, a link to it) are one photo too."""
    files = table["path"].map(same_file_key)
    repeated = files[files.duplicated()]
    if not repeated.empty:
        rows = table[files == repeated.iloc[0]]
        lines = ", ".join(str(i + 2) for i in rows.index)
        spellings = list(dict.fromkeys(rows["filename"]))
        written = f", written {' and '.join(spellings)}" if len(spellings) > 1 else ""
        raise SpotmatchError(f"{csv_path}: {spellings[0]} is listed more than once (lines {lines}{written}); keep one row for it")


def load_dataset(csv_path: str | Path, image_dir: str | Path | None = None, drop_ambiguous: bool = True) -> Dataset:
    """Read a labelled table; rows whose `unambiguous` column is false are dropped unless asked otherwise."""
    csv_path = Path(csv_path)
    table = read_csv_table(csv_path)
    filename_col = _pick_column(table, FILENAME_ALIASES, "filename", csv_path)
    identity_col = _pick_column(table, IDENTITY_ALIASES, "identity", csv_path)
    table = table.rename(columns={filename_col: "filename", identity_col: "identity"})
    # Spaces around a cell (a "name, label" file) would name another file and make " Cat1" another animal.
    table["filename"], table["identity"] = table["filename"].str.strip(), table["identity"].str.strip()
    if "unambiguous" in table.columns and drop_ambiguous:
        table = table[table["unambiguous"].str.lower().isin(("true", "1", "yes"))]
    if table.empty:
        raise SpotmatchError(f"{csv_path}: no labelled images in the table; add rows or check the filters")
    if (table["identity"] == "").any():
        row = int((table["identity"] == "").idxmax()) + 2
        raise SpotmatchError(f"{csv_path}: empty {identity_col.strip()} on line {row}; fill it in or remove the row")
    refuse_conflicting_labels(table, "filename", "identity", csv_path)
    if "side" in table.columns:  # one spelling everywhere: left, right, or missing where not known
        table["side"] = [parse_side(value, f"{csv_path} line {row + 2}") for row, value in zip(table.index, table["side"])]
    image_dir = Path(image_dir) if image_dir is not None else default_image_dir(csv_path)
    table["path"] = [absolute_path(on_disk_spelling(image_dir / name)) for name in table["filename"]]
    refuse_repeated_rows(table, csv_path)  # before the index is reset: it gives the CSV's line numbers
    table = table.reset_index(drop=True)
    check_files_exist([Path(p) for p in table["path"]], csv_path, table["filename"].tolist())
    return Dataset(table=table, image_dir=image_dir, csv_path=csv_path)


def load_pairs(csv_path: str | Path, image_dir: str | Path | None = None) -> pd.DataFrame:
    """Kaggle `test.csv`: one row per (query, gallery) pair, `row_id` unique; adds absolute paths."""
    csv_path = Path(csv_path)
    table = read_csv_table(csv_path)
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in PAIR_COLUMNS if c not in table.columns]
    if missing:
        raise SpotmatchError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; a pairs CSV needs {', '.join(PAIR_COLUMNS)}"
        )
    if table.empty:
        raise SpotmatchError(f"{csv_path}: no pairs in the file; nothing to score")
    for column in PAIR_COLUMNS:
        table[column] = table[column].str.strip()  # "row_id, query_image, gallery_image" files put a space before each
        empty = table[column] == ""
        if empty.any():
            raise SpotmatchError(f"{csv_path}: empty {column} on line {int(empty.idxmax()) + 2}; fill it in or remove the row")
    duplicated = table["row_id"][table["row_id"].duplicated()]
    if not duplicated.empty:
        raise SpotmatchError(
            f"{csv_path}: row_id {duplicated.iloc[0]!r} appears more than once; row_id must be unique per pair"
        )
    image_dir = Path(image_dir) if image_dir is not None else default_image_dir(csv_path)
    # Each distinct name resolved once: a competition file names a few hundred images in 10^5 to 10^6 rows,
    # and resolving per row walked the file system twice a row; the rows then share the path strings.
    names = pd.unique(pd.concat([table["query_image"], table["gallery_image"]], ignore_index=True))
    path_of = {name: absolute_path(on_disk_spelling(image_dir / name)) for name in names}
    for column in ("query_image", "gallery_image"):
        table[f"{column}_path"] = table[column].map(path_of)
    check_files_exist([Path(p) for p in path_of.values()], csv_path, list(path_of))
    return table
