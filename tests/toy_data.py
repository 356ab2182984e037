"""Small real-looking labelled CSV datasets and recipes written into a test's tmp folder."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import yaml

POSITIVE = ["good", "great", "awesome", "love", "best", "fun", "happy"]
NEGATIVE = ["bad", "terrible", "awful", "hate", "worst", "boring", "sad"]
TOPICS = {
    "movies": ["movie", "film", "plot", "actor", "story"],
    "flights": ["flight", "delay", "airline", "united", "late"],
    "phones": ["apple", "iphone"],
    "cars": ["car", "cars", "driverless", "self", "driving"],
}


def write_toy_dataset(folder: Path, name: str, topic: str, rows: int = 120, seed: int = 0) -> Path:
    """A binary sentiment CSV on one topic, and its recipe YAML; returns the recipe path."""
    rng = random.Random(f"{name}-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "sentiment"])
        for i in range(rows):
            label = "positive" if i % 2 else "negative"
            words = rng.sample(TOPICS[topic], 2) + rng.sample(POSITIVE if i % 2 else NEGATIVE, 2) + ["the", "a"]
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "source": str(data),
                "text_column": "text",
                "label_column": "sentiment",
                "label_names": ["negative", "positive"],
                "split_fractions": [0.2, 0.2],
            }
        )
    )
    return recipe


def write_toy_datasets(folder: Path, count: int = 3) -> list[str]:
    return [str(write_toy_dataset(folder, f"toy_{topic}", topic)) for topic in list(TOPICS)[:count]]
