"""Every mistake a user makes when loading or calling a model gets a message naming it."""
import json
import shutil

import pytest
import torch

import minift
from minift.pretrained import resolve


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        minift.BertModel.from_pretrained(tmp_path)


def test_directory_without_weights(tmp_path):
    shutil.copy(resolve("minilm") / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        minift.BertModel.from_pretrained(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        minift.BertModel.from_pretrained(tmp_path / "nope")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    src = resolve("minilm")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 1024
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.bias.*\(1536,\).*\(1024,\)"):
        minift.BertModel.from_pretrained(tmp_path)


def test_missing_encoder_weight_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file
    src = resolve("minilm")
    shutil.copy(src / "config.json", tmp_path)
    state = load_file(str(src / "model.safetensors"))
    del state["encoder.layer.3.output.dense.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.3\.output\.dense\.weight"):
        minift.BertForSequenceClassification.from_pretrained(tmp_path)


def test_unknown_override():
    with pytest.raises(TypeError, match="unknown config option"):
        minift.BertModel.from_pretrained("minilm", num_layerz=3)


@pytest.fixture(scope="module")
def model():
    return minift.BertModel.from_pretrained("minilm").eval()


def test_too_long(model):
    with pytest.raises(ValueError, match="513 exceeds max_position_embeddings \\(512\\)"):
        model(torch.ones(1, 513, dtype=torch.long))


def test_ids_outside_vocab(model):
    with pytest.raises(ValueError, match=r"\[0, 30522\).*30522\]"):
        model(torch.tensor([[101, 30522]]))
    with pytest.raises(ValueError, match=r"\[-1, "):
        model(torch.tensor([[-1, 5]]))


def test_float_ids(model):
    with pytest.raises(TypeError, match="integer tensor.*float32"):
        model(torch.tensor([[101.0, 102.0]]))


def test_mask_shape(model):
    with pytest.raises(ValueError, match="attention_mask: expected shape \\(1, 2\\)"):
        model(torch.tensor([[101, 102]]), attention_mask=torch.ones(1, 3))


def test_bad_impl():
    with pytest.raises(ValueError, match="impl: expected one of"):
        minift.BertModel.from_pretrained("minilm", impl="cuda")
