"""pytest plugin for PEFT's own tests: a local stand-in for the hub dataset ``ybelkada/english_quotes_copy``
(PEFT's gradient-checkpointing training tests load it), so they run offline."""

from __future__ import annotations

import random


def _english_quotes():
    from datasets import Dataset, DatasetDict
    from stand_in_models import WORDS

    rng = random.Random(0)
    quotes = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + " ." for _ in range(64)]
    authors = [f"author{i % 7}" for i in range(64)]
    return DatasetDict({"train": Dataset.from_dict({"quote": quotes, "author": authors})})


def pytest_configure(config):
    import tests.testing_utils as testing_utils

    real = testing_utils.load_dataset

    def load_dataset(path, *args, **kwargs):
        if path == "ybelkada/english_quotes_copy":
            return _english_quotes()
        return real(path, *args, **kwargs)

    testing_utils.load_dataset = load_dataset
