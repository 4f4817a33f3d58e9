"""The evaluation tests' model: the shared tiny export with its rows widened so GSM8K prompts fit."""
import json
import shutil

import pytest

SEQ_LEN = 320  # a RoPE network takes any width


@pytest.fixture(scope="session")
def export(export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("wide") / "export"
    shutil.copytree(export_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "seq_len": SEQ_LEN}))
    return out
