"""List files and class indexes of the published splits (SPEC §3), and their errors."""

from __future__ import annotations

import pytest

from adafocus.data import ListFileError, parse_list, read_class_index


def write(path, text):
    path.write_text(text)
    return path


def test_actnet_comma_multilabel(tmp_path):
    f = write(
        tmp_path / "actnet_train_split.txt", "v_abc,120,3\nv_def,88,1,7\n\nv_short,2,4\nv_ghi,300,0,5,9\n"
    )
    entries = parse_list(f, "comma", num_classes=200)
    assert [(e.path, e.num_frames, e.labels, e.line) for e in entries] == [
        ("v_abc", 120, (3,), 1),
        ("v_def", 88, (1, 7), 2),
        ("v_ghi", 300, (0, 5, 9), 5),  # v_short (< 3 frames) dropped as in the original
    ]


def test_fcvid_comma_with_subdirs(tmp_path):
    f = write(tmp_path / "fcvid_val_split.txt", "cat/clip_001,450,12\ndog/clip_7,3000,238,0\n")
    entries = parse_list(f, "comma", num_classes=239)
    assert [(e.path, e.labels) for e in entries] == [("cat/clip_001", (12,)), ("dog/clip_7", (238, 0))]


def test_minik_space_paths_with_spaces(tmp_path):
    f = write(
        tmp_path / "mini_val_videofolder.txt",
        "air drumming/--nQbRBEz2s_000104_000114 250 3\nplaying  bass guitar/x y z 300 199\nzumba/abc 10 0\n",
    )
    entries = parse_list(f, "space", num_classes=200)
    assert [(e.path, e.num_frames, e.labels) for e in entries] == [
        ("air drumming/--nQbRBEz2s_000104_000114", 250, (3,)),
        ("playing  bass guitar/x y z", 300, (199,)),
        ("zumba/abc", 10, (0,)),
    ]


@pytest.mark.parametrize(
    "fmt,text,bad_line",
    [
        ("comma", "a,10,1\nb,10\n", 2),  # too few fields
        ("comma", "a,10,1\nb,ten,1\n", 2),  # not a number
        ("space", "a b 10 1\nc 10 x\n", 2),
        ("space", "a 10 1\n\nonlyonefield\n", 3),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, fmt, text, bad_line):
    f = write(tmp_path / "list.txt", text)
    with pytest.raises(ListFileError, match=rf"{f}:{bad_line}: malformed"):
        parse_list(f, fmt, num_classes=5)


@pytest.mark.parametrize("label", [5, -1])
def test_label_out_of_range_names_file_and_line(tmp_path, label):
    f = write(tmp_path / "list.txt", f"a,10,1\nb,10,2,{label}\n")
    with pytest.raises(ListFileError, match=rf"{f}:2: label\(s\) \[{label}\] outside \[0, 5\)"):
        parse_list(f, "comma", num_classes=5)


def test_missing_files_name_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.txt")):
        parse_list(tmp_path / "nope.txt", "comma")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "classInd.txt")):
        read_class_index(tmp_path / "classInd.txt")


@pytest.mark.parametrize(
    "text",
    ["Applying sunscreen\nArchery\nArm wrestling\n", "1 Applying sunscreen\n2 Archery\n3 Arm wrestling\n",
     "0,Applying sunscreen\n1,Archery\n2,Arm wrestling\n"],
)  # fmt: skip
def test_class_index_variants(tmp_path, text):
    f = write(tmp_path / "classInd.txt", text)
    assert read_class_index(f, 3) == ["Applying sunscreen", "Archery", "Arm wrestling"]
    with pytest.raises(ListFileError, match="3 classes, but dataset.num_classes = 4"):
        read_class_index(f, 4)


def test_encoding_errors_name_the_file_and_line_and_a_bom_is_not_part_of_the_path(tmp_path, caplog):
    good = tmp_path / "bom.txt"
    good.write_bytes("\ufeffa/v1,10,0\nb/v2,2,1\nc/v3,12,1\n".encode())  # a BOM, and a 2-frame video
    with caplog.at_level("WARNING"):
        entries = parse_list(good, "comma", num_classes=2)
    assert [e.path for e in entries] == ["a/v1", "c/v3"]  # no BOM in the first path
    assert "1 entries with fewer than 3 frames left out" in caplog.text and "2:b/v2" in caplog.text
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("a/v1,10,0\ncaf\xe9/v2,10,1\n".encode("latin-1"))
    with pytest.raises(ListFileError, match=rf"{latin}:2: the list file is not UTF-8 text \(byte b'\\xe9'"):
        parse_list(latin, "comma")
    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"\xff\xfeo\x00k\x00\n")  # UTF-16
    with pytest.raises(ListFileError, match=rf"{classes}:1: the class index is not UTF-8"):
        read_class_index(classes)
