"""read_text: one way to read a file a user named, failing with a typed error that names it."""

from __future__ import annotations

import pytest

from moemesh.errors import ConfigError, InvalidRequestError, read_text


def test_reads_the_text(tmp_path):
    (tmp_path / "t.yaml").write_text("a: 1\n")
    assert read_text(tmp_path / "t.yaml", "topology") == "a: 1\n"


def test_a_missing_file_names_what_and_where(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(InvalidRequestError, match=r"cannot read trace .*nope\.json: No such file") as info:
        read_text(missing, "trace")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_the_error_type_is_the_callers(tmp_path):
    with pytest.raises(ConfigError, match="cannot read topology"):
        read_text(tmp_path, "topology", ConfigError)  # a folder: IsADirectoryError
