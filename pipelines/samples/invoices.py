"""Synthetic invoice emails for `conf/jobs/invoice_fields.yaml`, and the fields to extract (`Invoice`).

Each email states an invoice's number, vendor, date, currency and total in one
of several layouts (a formal invoice block, a short email, a reminder), drawn
from a seeded generator; the `true_*` columns hold the values it was built from.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipelines.samples import DEFAULT_SEED


class Invoice(BaseModel):
    """The fields `invoice_fields` extracts (`extract.model: pipelines.samples.invoices:Invoice`)."""

    # additionalProperties: false in the schema. xgrammar assumes it; guidance does
    # not, and lets a small model append fields of its own until max_tokens.
    model_config = ConfigDict(extra="forbid")

    # Length caps go into the decoding grammar: a small model that starts to
    # ramble inside a string is stopped there instead of at max_tokens.
    invoice_number: str = Field(max_length=24, description="The invoice's number exactly as written, e.g. INV-20931.")
    vendor: str = Field(max_length=64, description="The company that issued the invoice.")
    invoice_date: dt.date = Field(description="The date the invoice was issued (YYYY-MM-DD).")
    currency: Literal["USD", "EUR", "GBP"] = Field(description="The currency of the total.")
    total: float = Field(description="The amount due, as a number without currency symbol.")


VENDORS = ["Northwind Traders", "Contoso Supplies", "Globex Logistics", "Initech Software", "Umbrella Catering",
           "Stark Office Furniture", "Wayne Cleaning Services", "Acme Hardware"]
SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£"}
LAYOUTS = [
    "INVOICE {number}\nFrom: {vendor}\nDate of issue: {date_long}\nAmount due: {symbol}{total}\n"
    "Please pay within 30 days.",
    "Hello,\n\nplease find attached invoice {number} from {vendor}, issued on {date_iso}. "
    "The total is {total} {currency}.\n\nKind regards,\nAccounts team",
    "Reminder from {vendor}: invoice {number} dated {date_long} for {currency} {total} is still open.",
    "{vendor}\nInvoice no. {number} | {date_iso}\nSubtotal and tax included. Total: {symbol}{total} ({currency})",
]


def make_invoices(n: int = 120, seed: int = DEFAULT_SEED) -> pa.Table:
    """`n` synthetic invoice emails as one Arrow table."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        currency = rng.choice(list(SYMBOLS))
        date = dt.date(2026, 1, 1) + dt.timedelta(days=rng.randint(0, 330))
        total = round(rng.uniform(20, 9000), 2)
        fill = {
            "number": f"INV-{rng.randint(10000, 99999)}",
            "vendor": rng.choice(VENDORS),
            "date_iso": date.isoformat(),
            "date_long": date.strftime("%B %d, %Y").replace(" 0", " "),
            "currency": currency,
            "symbol": SYMBOLS[currency],
            "total": f"{total:.2f}",
        }
        rows.append({
            "email_id": f"E-{i + 1:06d}",
            "email": rng.choice(LAYOUTS).format(**fill),
            "true_invoice_number": fill["number"],
            "true_vendor": fill["vendor"],
            "true_invoice_date": date,
            "true_currency": currency,
            "true_total": total,
        })
    schema = pa.schema([("email_id", pa.string()), ("email", pa.string()), ("true_invoice_number", pa.string()),
                        ("true_vendor", pa.string()), ("true_invoice_date", pa.date32()),
                        ("true_currency", pa.string()), ("true_total", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)
