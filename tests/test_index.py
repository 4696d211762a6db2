"""`moviegen data index` and `moviegen data inspect`, including bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import index_frames
from moviegen.cli import USAGE_ERROR, main
from moviegen.data.index import index_folder, inspect_manifest
from moviegen.data.manifest import read_manifest
from moviegen.data.video_io import write_video


@pytest.fixture
def media_folder(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    write_video(root / "good.mp4", index_frames(20), fps=10)
    (root / "good.txt").write_text("a good clip\n", encoding="utf-8")
    write_video(root / "sub" / "long.mkv", index_frames(30, 32, 48), fps=15)
    (root / "sub" / "long.txt").write_text("a lossless clip", encoding="utf-8")
    Image.fromarray(index_frames(1)[0]).save(root / "still.png")
    (root / "captions.csv").write_text("path,caption\nstill.png,a still frame\n", encoding="utf-8")
    # Bad input, one of each kind.
    write_video(root / "latin1.mp4", index_frames(5), fps=10)
    (root / "latin1.txt").write_bytes("une vidéo".encode("latin-1"))
    write_video(root / "uncaptioned.mp4", index_frames(5), fps=10)
    write_video(root / "blank.mp4", index_frames(5), fps=10)
    (root / "blank.txt").write_text("  \n", encoding="utf-8")
    (root / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "noise.txt").write_text("random bytes", encoding="utf-8")
    (root / "empty.mp4").touch()
    (root / "empty.txt").write_text("empty file", encoding="utf-8")
    (root / "folder.mp4").mkdir()
    (root / "folder.txt").write_text("a directory", encoding="utf-8")
    whole = write_video(root / "whole.mp4", index_frames(20), fps=10).read_bytes()
    (root / "whole.mp4").unlink()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (root / "truncated.txt").write_text("cut in half", encoding="utf-8")
    (root / ".hidden.mp4").write_bytes(b"ignored")
    return root


EXPECTED_SKIPS = {
    "latin1.mp4": "caption_encoding",
    "uncaptioned.mp4": "no_caption",
    "blank.mp4": "empty_caption",
    "noise.mp4": "corrupt",
    "empty.mp4": "empty",
    "folder.mp4": "not_a_file",
    "truncated.mp4": "corrupt",
}


def test_index_folder_probes_and_counts_skips(media_folder):
    result = index_folder(media_folder, progress=False)
    by_path = {
        record.path.relative_to(media_folder).as_posix(): record for record in result.records
    }
    assert set(by_path) == {"good.mp4", "sub/long.mkv", "still.png"}
    good = by_path["good.mp4"]
    assert (good.caption, good.num_frames, good.fps, good.width, good.height) == (
        "a good clip",
        20,
        10.0,
        64,
        48,
    )
    assert good.duration == pytest.approx(2.0)
    assert by_path["sub/long.mkv"].fps == 15.0
    assert by_path["still.png"].caption == "a still frame"
    assert by_path["still.png"].num_frames == 1
    assert {item.path: item.reason for item in result.skipped} == EXPECTED_SKIPS
    assert sum(result.skip_counts().values()) == len(EXPECTED_SKIPS)


def test_cli_index_then_inspect(media_folder, tmp_path, capsys):
    manifest = tmp_path / "out" / "manifest.jsonl"
    assert main(["data", "index", str(media_folder), "--out", str(manifest), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 clips" in printed
    assert "caption_encoding: 1" in printed and "latin1.mp4" in printed
    records = read_manifest(manifest)
    assert len(records) == 3 and all(record.path.exists() for record in records)

    assert main(["data", "inspect", str(manifest), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["num_records"], report["num_videos"], report["num_images"]) == (3, 2, 1)
    assert report["resolutions"] == {"64x48": 2, "48x32": 1}
    assert report["frame_rates"] == {"10": 1, "15": 1}
    assert report["duration_histogram"] == {"[2, 4)": 2}
    assert report["unreadable"] == []


def test_inspect_lists_unreadable_files(media_folder, tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"path": str(media_folder / "good.mp4"), "caption": "ok"},
        {"path": str(media_folder / "noise.mp4"), "caption": "bad"},
        {"path": str(media_folder / "gone.mp4"), "caption": "missing"},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    report = inspect_manifest(manifest, progress=False)
    assert report.num_videos == 1
    assert [(item["path"].split("/")[-1], item["reason"]) for item in report.unreadable] == [
        ("noise.mp4", "corrupt"),
        ("gone.mp4", "missing"),
    ]
    text = report.format()
    assert "unreadable: 2" in text and "gone.mp4: missing" in text


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.mp4", "caption": "x"}\n{"path": 5}\n', encoding="utf-8")
    assert main(["data", "inspect", str(bad), "--quiet"]) == USAGE_ERROR
    error = capsys.readouterr().err
    assert error.startswith("moviegen: error:") and "bad.jsonl:2" in error
    assert "Traceback" not in error
    assert main(["data", "index", str(tmp_path / "nowhere"), "--out", str(bad)]) == USAGE_ERROR
    assert "not a folder" in capsys.readouterr().err


def test_bad_captions_csv_is_a_clear_error(tmp_path):
    (tmp_path / "captions.csv").write_text("file_name,text\na.mp4,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'path'"):
        index_folder(tmp_path, progress=False)
