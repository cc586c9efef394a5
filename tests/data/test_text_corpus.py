"""``text_corpus`` refuses what is not a UTF-8 text file with one clear error per case."""

import pytest

from gradstats.data import text_corpus
from gradstats.errors import ConfigurationError


def _folder(tmp_path):
    (tmp_path / "folder").mkdir()
    return tmp_path / "folder"


def _missing(tmp_path):
    return tmp_path / "nope.txt"


def _empty(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    return tmp_path / "empty.txt"


def _binary(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    return tmp_path / "bin.txt"


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (_folder, IsADirectoryError, "is a folder; give a UTF-8 text file"),
        (_missing, FileNotFoundError, "no such file"),
        (_empty, ConfigurationError, "is empty"),
        (_binary, ConfigurationError, "not UTF-8"),
    ],
    ids=["folder", "missing", "empty", "binary"],
)
def test_bad_data_files(tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        text_corpus(make(tmp_path))
