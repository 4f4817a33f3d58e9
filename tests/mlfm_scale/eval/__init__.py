import re

import pytest

from mlfm_scale.errors import UserError


def assert_line_refused(tmp_path, first: str, line: str, message: str, read) -> None:
    """A JSONL file of a good ``first`` line and a bad ``line`` is refused by ``read(path)``, naming file and line."""
    path = tmp_path / "file.jsonl"
    path.write_text(first + "\n" + line + "\n")
    with pytest.raises(UserError, match=re.escape(f"{path}{message}")):
        read(path)
