"""Synthetic product reviews for `conf/jobs/review_sentiment.yaml`.

Each review is assembled from phrases of one sentiment (positive, negative or
neutral: mixed praise and complaint, or plain description) about a product
drawn from a seeded generator; `true_sentiment` is the sentiment it was built
from.
"""

from __future__ import annotations

import random

import pyarrow as pa

from pipelines.samples import DEFAULT_SEED

PRODUCTS = ["wireless earbuds", "standing desk", "coffee grinder", "hiking backpack", "e-reader",
            "air purifier", "robot vacuum", "desk lamp", "running shoes", "cast-iron pan"]
PHRASES: dict[str, dict[str, list[str]]] = {
    "positive": {
        "titles": ["Love it", "Exceeded my expectations", "Best purchase this year", "Highly recommend",
                   "Five stars"],
        "sentences": [
            "The {product} works perfectly and feels very well made.",
            "I have used the {product} every day for {weeks} weeks and it is still excellent.",
            "Setup took five minutes and the {product} has been flawless since.",
            "Great value for the price; I already bought a second {product} as a gift.",
            "Customer service answered within an hour and was wonderful.",
            "Honestly the best {product} I have owned.",
        ],
    },
    "negative": {
        "titles": ["Very disappointed", "Broke after {weeks} weeks", "Do not buy", "Waste of money",
                   "Returned it"],
        "sentences": [
            "The {product} stopped working after {weeks} weeks and support never replied.",
            "Cheap materials; the {product} arrived scratched and one part was missing.",
            "It is much worse than the photos suggest and I regret buying this {product}.",
            "I asked for a refund because the {product} failed twice in a week.",
            "Terrible quality, it broke the first time I used it.",
            "Avoid this {product}; mine was defective out of the box.",
        ],
    },
    "neutral": {
        "titles": ["It is okay", "Does the job", "Average", "Mixed feelings", "As described"],
        "sentences": [
            "The {product} does what it says, nothing more and nothing less.",
            "Delivery took {weeks} weeks, which was as estimated.",
            "Some features of the {product} are good while others are a bit clumsy.",
            "It is an average {product} for an average price.",
            "The {product} is fine for occasional use; I have no strong opinion yet.",
            "Packaging was plain and the manual was short but adequate.",
        ],
    },
}


def make_reviews(n: int = 240, seed: int = DEFAULT_SEED) -> pa.Table:
    """`n` synthetic reviews as one Arrow table."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sentiment = rng.choice(list(PHRASES))
        fill = {"product": rng.choice(PRODUCTS), "weeks": rng.randint(2, 12)}
        phrases = PHRASES[sentiment]
        sentences = rng.sample(phrases["sentences"], k=rng.randint(2, 3))
        rows.append({
            "review_id": f"R-{i + 1:06d}",
            "product": fill["product"],
            "title": rng.choice(phrases["titles"]).format(**fill),
            "text": " ".join(s.format(**fill) for s in sentences),
            "true_sentiment": sentiment,
        })
    schema = pa.schema([("review_id", pa.string()), ("product", pa.string()), ("title", pa.string()),
                        ("text", pa.string()), ("true_sentiment", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)
