"""Assignment part "finetune": write the training loop, and reach the target accuracy.

The grader fine-tunes MiniLM on 640 Rotten Tomatoes snippets with your loop and checks the
accuracy on 300 held-out snippets: at least 0.70 earns the points (the untrained model is at
chance, about 0.5-0.57).
"""
from minift import optim


def train(model, batches, epochs=2, lr=2e-4, weight_decay=0.01, warmup_ratio=0.1, clip=1.0):
    """Fine-tune ``model`` (a minift.BertForSequenceClassification) in place.

    batches: a list of dicts with input_ids, attention_mask, token_type_ids, labels.
    Use minift.optim: AdamW over optim.param_groups(model, weight_decay), the schedule
    optim.linear_warmup_decay with an LRSchedule, and optim.clip_grad_norm.
    Returns the list of training losses, one per step.
    """
    losses = []
    # BEGIN SOLUTION hint="optimizer = optim.AdamW(optim.param_groups(...)); schedule = optim.LRSchedule(...); for each epoch and batch: loss = model(..., labels=...).loss; backward; clip; step; schedule.step(); zero_grad"
    total = epochs * len(batches)
    opt = optim.AdamW(optim.param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay)
    schedule = optim.LRSchedule(opt, optim.linear_warmup_decay(int(warmup_ratio * total), total))
    model.train()
    for _ in range(epochs):
        for b in batches:
            loss = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], labels=b["labels"]).loss
            loss.backward()
            optim.clip_grad_norm(model.parameters(), clip)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    # END SOLUTION
    return losses
