import torch

import minift
from minift import data, tasks
from finetune import train


def test_reaches_target_accuracy():
    torch.manual_seed(0)
    ds = tasks.rotten_tomatoes()
    tok = minift.Tokenizer.from_pretrained("minilm")
    model = minift.BertForSequenceClassification.from_pretrained("minilm", num_labels=2)
    train_set = data.encode_classification(tok, ds.train[:640], ds.labels, 64)
    dev_set = data.encode_classification(tok, ds.dev[:300], ds.labels, 64)
    order = sorted(range(640), key=lambda i: len(train_set.input_ids[i]))
    batches = [data.collate(train_set, order[i:i + 32]) for i in range(0, 640, 32)]
    g = torch.Generator().manual_seed(0)
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    losses = train(model, batches)
    assert len(losses) == 2 * len(batches)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, 300, 100):
            b = data.collate(dev_set, list(range(i, min(i + 100, 300))))
            correct += (model(b["input_ids"], b["attention_mask"]).logits.argmax(-1) == b["labels"]).sum().item()
    accuracy = correct / 300
    print(f"held-out accuracy {accuracy:.3f}")
    assert accuracy >= 0.70
