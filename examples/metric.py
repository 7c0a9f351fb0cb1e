"""Classification accuracy for the digits examples: ``edgeq compile … --metric examples/metric.py:accuracy``.

A metric receives the model outputs of every evaluation feed and the feeds themselves; arrays stored in a feed
file under names that are not model inputs (here ``label``) arrive as ``feed.extras``.
"""


def accuracy(outputs, feeds) -> float:
    correct = total = 0
    for out, feed in zip(outputs, feeds):
        logits = next(iter(out.values()))
        if "label" not in feed.extras:
            raise ValueError(f"feed {feed.origin} has no 'label' array: accuracy needs labelled feeds "
                             "(save them with numpy.savez(..., label=...))")
        labels = feed.extras["label"]
        correct += int((logits.argmax(axis=1) == labels).sum())
        total += len(labels)
    return correct / total
