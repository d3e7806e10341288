"""Synthetic support tickets for `conf/jobs/ticket_triage.yaml`.

Each ticket is built from a category's subject and body templates filled with
products, symptoms and customer details drawn from a seeded generator, so the
same seed gives the same shards everywhere, and every ticket carries the
category it was generated from (`true_category`) for later quality checks.
"""

from __future__ import annotations

import datetime as dt
import random

import pyarrow as pa

PRODUCTS = ["Acme Router X2", "Acme Cloud Backup", "Acme Smart Thermostat", "Acme Mobile App", "Acme Pro Plan"]
CHANNELS = ["email", "chat", "web_form", "phone_transcript"]
TIERS = ["free", "standard", "enterprise"]

CATEGORIES: dict[str, dict[str, list[str]]] = {
    "billing": {
        "subjects": ["Charged twice for {product}", "Refund request for {product}", "Invoice {num} looks wrong",
                     "Why did my {product} bill go up?"],
        "bodies": [
            "Hi, I was charged {amount} twice this month for {product}. Order number {num}. Please refund one charge.",
            "My invoice {num} shows {amount} but my plan should cost less. Can someone explain the difference?",
            "I cancelled {product} on {date} but was still billed {amount}. I would like a refund.",
        ],
    },
    "technical": {
        "subjects": ["{product} keeps {symptom}", "{product} error code {code}", "{product} not working after update"],
        "bodies": [
            "Since the last update my {product} keeps {symptom}. I restarted it twice. Error code {code}.",
            "Every time I open {product} it shows error {code} and then {symptom}. This started on {date}.",
            "The {product} worked fine until {date}. Now it keeps {symptom} several times a day.",
        ],
    },
    "account": {
        "subjects": ["Cannot log in to my account", "Reset my password", "Change the email on my account",
                     "Two-factor code never arrives"],
        "bodies": [
            "I cannot log in since {date}. The password reset email never arrives. My username is {user}.",
            "Please change the email address on account {user}; I no longer have access to the old one.",
            "The two-factor code for {user} never arrives by SMS, so I am locked out of {product}.",
        ],
    },
    "shipping": {
        "subjects": ["Where is my order {num}?", "{product} arrived damaged", "Wrong item delivered"],
        "bodies": [
            "My order {num} for {product} was due on {date} and has not arrived. Tracking has not moved in days.",
            "The box for {product} arrived crushed and the device does not turn on. Order {num}.",
            "I ordered {product} (order {num}) but received something else. How do I return it?",
        ],
    },
    "feature_request": {
        "subjects": ["Suggestion for {product}", "Please add dark mode", "Export to CSV in {product}"],
        "bodies": [
            "It would be great if {product} could export reports to CSV. Our team needs this weekly.",
            "Please add a dark mode to {product}; the white screen is hard on the eyes at night.",
            "Could {product} support scheduling? We would pay more for the {tier} plan if it did.",
        ],
    },
}
SYMPTOMS = ["disconnecting", "freezing", "rebooting", "losing settings", "running slowly", "crashing"]


def make_tickets(n: int = 300, seed: int = 20261128) -> pa.Table:
    """`n` synthetic tickets as one Arrow table."""
    rng = random.Random(seed)
    start = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    rows = []
    for i in range(n):
        category = rng.choice(list(CATEGORIES))
        fill = {
            "product": rng.choice(PRODUCTS),
            "symptom": rng.choice(SYMPTOMS),
            "code": f"E{rng.randint(100, 999)}",
            "num": f"{rng.randint(100000, 999999)}",
            "amount": f"${rng.randint(5, 400)}.{rng.randint(0, 99):02d}",
            "date": (start - dt.timedelta(days=rng.randint(1, 60))).strftime("%B %d"),
            "user": f"user{rng.randint(1000, 9999)}",
            "tier": rng.choice(TIERS),
        }
        rows.append(
            {
                "ticket_id": f"T-{i + 1:06d}",
                "created_at": start + dt.timedelta(minutes=rng.randint(0, 60 * 24 * 27)),
                "channel": rng.choice(CHANNELS),
                "customer_tier": fill["tier"],
                "subject": rng.choice(CATEGORIES[category]["subjects"]).format(**fill),
                "body": rng.choice(CATEGORIES[category]["bodies"]).format(**fill),
                "true_category": category,
            }
        )
    schema = pa.schema(
        [
            ("ticket_id", pa.string()),
            ("created_at", pa.timestamp("us", tz="UTC")),
            ("channel", pa.string()),
            ("customer_tier", pa.string()),
            ("subject", pa.string()),
            ("body", pa.string()),
            ("true_category", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)
