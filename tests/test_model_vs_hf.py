"""minift's BERT against Hugging Face transformers on the real MiniLM weights."""
import copy

import pytest
import torch

import minift

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ours():
    return minift.BertModel.from_pretrained("minilm").eval()


@pytest.fixture(scope="module")
def theirs(minilm_dir):
    return transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()


def _run(model, batch, hf=False):
    args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])
    with torch.no_grad():
        return model(**args)


def test_encoder_matches_transformers_float32(ours, theirs, batch):
    a, b = _run(ours, batch), _run(theirs, batch)
    real = batch["attention_mask"].bool()
    assert (~real).any(), "the batch must contain padding"
    # Every real token to 1e-5. Padding positions are outputs nobody reads; in float32 both
    # libraries round there by up to ~2e-5 against float64 (next test checks them exactly).
    err = (a.last_hidden_state - b.last_hidden_state).abs()
    assert err[real].max() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5


def test_encoder_matches_transformers_float64_everywhere(ours, theirs, batch):
    a = _run(copy.deepcopy(ours).double(), batch)
    b = _run(copy.deepcopy(theirs).double(), batch)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= 1e-10
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-10


def test_sdpa_and_eager_hf_agree_with_us(ours, minilm_dir, batch):
    sdpa = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="sdpa").eval()
    a, b = _run(ours, batch), _run(sdpa, batch)
    real = batch["attention_mask"].bool()
    assert (a.last_hidden_state - b.last_hidden_state).abs()[real].max() <= 1e-5


HEADS = [
    ("BertForSequenceClassification", dict(num_labels=3)),
    ("BertForTokenClassification", dict(num_labels=5)),
    ("BertForMaskedLM", {}),
    ("BertForQuestionAnswering", {}),
]


@pytest.mark.parametrize("name,kw", HEADS, ids=[h[0] for h in HEADS])
def test_heads_match_transformers(name, kw, batch, tmp_path):
    torch.manual_seed(3)
    ours = getattr(minift, name).from_pretrained("minilm", **kw).eval()
    assert ours.load_report.missing_initialised, "a fresh head must be reported"
    ours.save_pretrained(tmp_path)
    theirs = getattr(transformers, name).from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    a, b = _run(ours, batch), _run(theirs, batch)
    real = batch["attention_mask"].bool()
    if name == "BertForQuestionAnswering":
        assert (a.start_logits - b.start_logits).abs()[real].max() <= 1e-5
        assert (a.end_logits - b.end_logits).abs()[real].max() <= 1e-5
    elif name == "BertForSequenceClassification":
        assert (a.logits - b.logits).abs().max() <= 1e-5
    else:
        assert (a.logits - b.logits).abs()[real].max() <= (1e-4 if name == "BertForMaskedLM" else 1e-5)


@pytest.mark.parametrize("problem,num_labels", [("single_label_classification", 3),
                                                ("multi_label_classification", 4), ("regression", 1)])
def test_sequence_classification_losses_match_transformers(problem, num_labels, batch, tmp_path):
    torch.manual_seed(1)
    ours = minift.BertForSequenceClassification.from_pretrained(
        "minilm", num_labels=num_labels, problem_type=problem).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.BertForSequenceClassification.from_pretrained(
        str(tmp_path), attn_implementation="eager").eval()
    B = batch["input_ids"].shape[0]
    g = torch.Generator().manual_seed(7)
    labels = {"single_label_classification": torch.randint(0, num_labels, (B,), generator=g),
              "multi_label_classification": torch.randint(0, 2, (B, num_labels), generator=g).float(),
              "regression": torch.randn(B, generator=g)}[problem]
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        a, b = ours(**args, labels=labels), theirs(**args, labels=labels)
    assert theirs.config.problem_type == problem
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5


def test_token_classification_and_qa_losses_match(batch, tmp_path):
    torch.manual_seed(2)
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    B, T = batch["input_ids"].shape
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (B, T), generator=g).masked_fill(batch["attention_mask"] == 0, -100)
    tok = minift.BertForTokenClassification.from_pretrained("minilm", num_labels=4).eval()
    tok.save_pretrained(tmp_path / "tok")
    hf_tok = transformers.BertForTokenClassification.from_pretrained(str(tmp_path / "tok")).eval()
    qa = minift.BertForQuestionAnswering.from_pretrained("minilm").eval()
    qa.save_pretrained(tmp_path / "qa")
    hf_qa = transformers.BertForQuestionAnswering.from_pretrained(str(tmp_path / "qa")).eval()
    start = torch.tensor([1, 3, T + 5, 0])[:B]   # one answer truncated away: ignored
    end = torch.tensor([2, 6, T + 9, 1])[:B]
    with torch.no_grad():
        assert abs(tok(**args, labels=labels).loss.item() - hf_tok(**args, labels=labels).loss.item()) <= 1e-5
        a = qa(**args, start_positions=start, end_positions=end).loss.item()
        b = hf_qa(**args, start_positions=start, end_positions=end).loss.item()
    assert abs(a - b) <= 1e-5


def test_hf_saved_checkpoint_with_prefix_and_bin_loads(batch, tmp_path, minilm_dir):
    """A checkpoint written by transformers (bert. prefix, pytorch_model.bin) loads into minift."""
    torch.manual_seed(4)
    hf = transformers.BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2).eval()
    hf.save_pretrained(tmp_path)            # config.json (+ safetensors, replaced by a .bin below)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert any(k.startswith("bert.") for k in torch.load(tmp_path / "pytorch_model.bin"))
    ours = minift.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert ours.load_report.missing_initialised == []
    bare = minift.BertModel.from_pretrained(tmp_path).eval()
    assert "classifier.weight" in bare.load_report.unexpected
    a, b = _run(ours, batch), _run(hf, batch)
    assert (a.logits - b.logits).abs().max() <= 1e-5


def test_save_and_reload_roundtrip_is_exact(batch, tmp_path):
    torch.manual_seed(0)
    m = minift.BertForMaskedLM.from_pretrained("minilm").eval()
    m.save_pretrained(tmp_path)
    m2 = minift.BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert m2.load_report.missing_initialised == []
    assert m2.cls.predictions.bias.data_ptr() != m2.bert.embeddings.word_embeddings.weight.data_ptr()
    assert torch.equal(_run(m, batch).logits, _run(m2, batch).logits)
