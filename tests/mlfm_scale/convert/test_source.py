"""SafetensorsSource: one file, shards with and without an index; float32 tensors read one at a time; the
directory's config.json; clear errors for missing paths, empty directories, duplicated and missing keys."""
import pytest
import torch
from safetensors.torch import save_file

from mlfm_scale.convert.formats import plan_for
from mlfm_scale.convert.source import SafetensorsSource
from mlfm_scale.errors import UserError
from tests.mlfm_scale.convert.sources import model_cfg, write

STATE = {"a.weight": torch.arange(6.0).view(2, 3), "b.weight": torch.ones(4), "c.weight": torch.zeros(1, 2)}


@pytest.mark.parametrize("shards,index", [(1, True), (3, True), (3, False)], ids=["file", "index", "glob"])
def test_keys_shapes_and_tensors(tmp_path, shards, index):
    source = SafetensorsSource(write(STATE, tmp_path, shards=shards, index=index))
    assert sorted(source.keys()) == sorted(STATE)
    for key, t in STATE.items():
        assert source.shape(key) == tuple(t.shape)
        torch.testing.assert_close(source.get(key), t, rtol=0, atol=0)
    assert source.config() is None


def test_a_file_is_read_alone_and_bf16_comes_back_as_float32(tmp_path):
    save_file({"w": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)}, tmp_path / "x.safetensors")
    source = SafetensorsSource(tmp_path / "x.safetensors")
    assert source.get("w").dtype == torch.float32 and source.get("w").tolist() == [1.5, -2.0]
    assert source.where("w") == tmp_path / "x.safetensors"


def test_the_index_names_the_shards_a_stray_copy_is_ignored(tmp_path):
    write(STATE, tmp_path, shards=2)
    save_file(STATE, tmp_path / "consolidated.safetensors")  # not in the index
    source = SafetensorsSource(tmp_path)
    assert source.where("a.weight").name.startswith("model-")
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(UserError, match=r"a.weight is in both .* and .*: remove the stray shard"):
        SafetensorsSource(tmp_path)


def test_config_json_beside_the_weights(tmp_path):
    write(STATE, tmp_path, config={"d_model": 32})
    assert SafetensorsSource(tmp_path).config() == {"d_model": 32}
    assert SafetensorsSource(tmp_path / "model.safetensors").config() == {"d_model": 32}
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        SafetensorsSource(tmp_path).config()


def test_bad_paths_and_keys_are_named(tmp_path):
    with pytest.raises(UserError, match="nowhere does not exist"):
        SafetensorsSource(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty holds no \\*.safetensors files"):
        SafetensorsSource(tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="junk.safetensors is not a readable safetensors file"):
        SafetensorsSource(tmp_path / "junk.safetensors")
    sharded = write(STATE, tmp_path / "sharded", shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="names shards that are missing: model-00002-of-00002.safetensors"):
        SafetensorsSource(sharded)
    source = SafetensorsSource(write(STATE, tmp_path / "one"))
    with pytest.raises(UserError, match=r"d.weight is not in .*one"):
        source.get("d.weight")


def test_an_unknown_format_name_lists_the_formats(tmp_path):
    with pytest.raises(UserError, match="unknown checkpoint format 'gguf': one of smdm, llada"):
        plan_for("gguf", model_cfg(), tmp_path)
