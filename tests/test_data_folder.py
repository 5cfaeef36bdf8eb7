"""The dataset folder format: splits, atomic writes, and the reader for training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from productvlm.data import folder
from productvlm.errors import UserError


def test_split_is_a_pure_function_of_product_code():
    codes = list(range(10_000_000, 10_020_000))
    splits = [folder.split_of(c) for c in codes]
    n = Counter(splits)
    assert abs(n["train"] / len(codes) - 0.8) < 0.01
    assert abs(n["validation"] / len(codes) - 0.1) < 0.01
    assert abs(n["test"] / len(codes) - 0.1) < 0.01
    # a grown catalog keeps every product where it was
    grown = folder.assign_splits(codes + list(range(50_000_000, 50_005_000)))
    assert grown[: len(codes)] == splits
    assert folder.assign_splits(codes[:100], seed=1) != splits[:100]


@given(st.integers(min_value=-(2**62), max_value=2**62))
def test_split_of_is_deterministic(code):
    assert folder.split_of(code) == folder.split_of(code) in folder.SPLITS
    assert folder.split_of(code, fractions=(1.0, 0.0, 0.0)) == "train"


def test_stratified_split_has_the_proportions_in_every_category():
    codes = list(range(1000, 1000 + 930))
    cats = [("A", "B", "C")[i % 3] if i < 900 else "D" for i in range(930)]
    splits = folder.assign_splits(codes, strata=cats)
    for cat in "ABC":
        n = Counter(s for s, c in zip(splits, cats) if c == cat)
        assert (n["train"], n["validation"], n["test"]) == (240, 30, 30)
    assert Counter(s for s, c in zip(splits, cats) if c == "D") == {"train": 24, "validation": 3, "test": 3}
    assert folder.assign_splits(codes, strata=cats) == splits
    with pytest.raises(UserError, match="fractions"):
        folder.assign_splits(codes, fractions=(0.5, 0.5, 0.5))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    p = tmp_path / "a.jpg"
    folder.atomic_write_bytes(p, b"complete")
    assert p.read_bytes() == b"complete"
    with pytest.raises(TypeError):
        folder.atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"complete" and [q.name for q in tmp_path.iterdir()] == ["a.jpg"]
    stale = folder.tmp_path_for(tmp_path / "b.jpg")
    stale.write_bytes(b"half")
    assert folder.remove_partial_files(tmp_path) == 1 and not stale.exists() and p.exists()


def _make(tmp_path: Path, splits: dict[str, int]) -> Path:
    d = tmp_path / "ds"
    rows_by_split = {}
    for split, n in splits.items():
        rows_by_split[split] = []
        for i in range(n):
            src = f"https://x.test/{split}/{i}.jpg"
            path = d / split / folder.image_file_name(src)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"jpeg")
            rows_by_split[split].append(
                {"file_name": folder.image_file_name(src), "product_code": i, "title": f"t{i}"}
            )
    counts = folder.write_splits(d, rows_by_split)
    folder.write_dataset_json(d, {"counts": counts})
    return d


def test_read_split_gives_absolute_image_paths(tmp_path):
    d = _make(tmp_path, {"train": 3, "validation": 1, "test": 0})
    rows = folder.read_split(d, "train")
    assert [r["title"] for r in rows] == ["t0", "t1", "t2"]
    assert all(Path(r["image_path"]).is_absolute() and Path(r["image_path"]).is_file() for r in rows)
    assert folder.read_split(d, "test") == [] and not (d / "test").exists()
    assert json.loads((d / "dataset.json").read_text())["counts"] == {"train": 3, "validation": 1, "test": 0}
    Path(rows[1]["image_path"]).unlink()
    with pytest.raises(UserError, match="row 2"):
        folder.read_split(d, "train")
    with pytest.raises(UserError, match="unknown split"):
        folder.read_split(d, "dev")
    with pytest.raises(UserError, match="does not exist"):
        folder.read_split(tmp_path / "nope", "train")


def test_read_split_reports_bad_json_line(tmp_path):
    d = _make(tmp_path, {"train": 2})
    with open(d / "train" / folder.METADATA, "a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match="line 3"):
        folder.read_split(d, "train")


def test_image_key_is_shared_by_identical_sources():
    # pinned (sha256 of the URL, first 24 hex digits): a key that changed between runs or versions
    # would orphan every image already stored
    assert folder.image_key("https://a/b.jpg") == "714b906f270156884c959120"
    assert folder.image_key("https://a/b.jpg") != folder.image_key("https://a/c.jpg")
    assert folder.image_file_name("https://a/b.jpg") == "images/714b906f270156884c959120.jpg"
