"""Manifest parsing: good lines round trip, bad lines name their line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moviegen.data.manifest import ClipRecord, ManifestError, read_manifest, write_manifest


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip_keeps_fields_and_relative_paths(tmp_path):
    records = [
        ClipRecord(
            path=tmp_path / "clips" / "a.mp4",
            caption="a small red circle moving left",
            fps=8,
            num_frames=16,
            attributes={"colour": "red"},
        ),
        ClipRecord(path=tmp_path / "b.png", caption="ünïcode ✓", start=0.5, end=2.0),
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    first = json.loads(manifest.read_text(encoding="utf-8").splitlines()[0])
    assert first["path"] == "clips/a.mp4", "paths are stored relative to the manifest"
    assert read_manifest(manifest) == [
        ClipRecord(
            path=tmp_path / "clips" / "a.mp4",
            caption="a small red circle moving left",
            fps=8.0,
            num_frames=16,
            attributes={"colour": "red"},
        ),
        records[1],
    ]


def test_comments_and_blank_lines_are_skipped(tmp_path):
    manifest = _write_lines(
        tmp_path / "m.jsonl", ["# header", "", '{"path": "a.mp4", "caption": "x"}', "   "]
    )
    assert [record.caption for record in read_manifest(manifest)] == ["x"]


@pytest.mark.parametrize(
    ("bad_line", "field", "message"),
    [
        ('{"path": "a.mp4", "caption": "x"', None, "invalid JSON"),
        ("[1, 2]", None, "JSON object"),
        ('{"caption": "x"}', "path", "required"),
        ('{"path": "", "caption": "x"}', "path", "non-empty"),
        ('{"path": "a.mp4"}', "caption", "required"),
        ('{"path": "a.mp4", "caption": 3}', "caption", "string"),
        ('{"path": "a.mp4", "caption": "x", "fps": "fast"}', "fps", "number"),
        ('{"path": "a.mp4", "caption": "x", "fps": 0}', "fps", "positive"),
        ('{"path": "a.mp4", "caption": "x", "num_frames": 2.5}', "num_frames", "integer"),
        ('{"path": "a.mp4", "caption": "x", "num_frames": true}', "num_frames", "number"),
        ('{"path": "a.mp4", "caption": "x", "start": -1}', "start", "positive"),
        ('{"path": "a.mp4", "caption": "x", "start": 2, "end": 1}', "end", "after start"),
        ('{"path": "a.mp4", "caption": "x", "attributes": [1]}', "attributes", "object"),
        ('{"path": "a.mp4", "captoin": "x"}', "captoin", "unknown key"),
    ],
)
def test_errors_name_line_and_field(tmp_path, bad_line, field, message):
    good = '{"path": "ok.mp4", "caption": "fine"}'
    manifest = _write_lines(tmp_path / "m.jsonl", [good, "", good, bad_line, good])
    with pytest.raises(ManifestError, match=message) as caught:
        read_manifest(manifest)
    error = caught.value
    assert error.line == 4
    assert error.field == field
    assert "m.jsonl:4" in str(error)
    if field:
        assert repr(field) in str(error)


def test_non_utf8_line_is_reported(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(
        b'{"path": "a.mp4", "caption": "ok"}\n{"path": "b.mp4", "caption": "\xff"}\n'
    )
    with pytest.raises(ManifestError, match="UTF-8") as caught:
        read_manifest(manifest)
    assert caught.value.line == 2


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
