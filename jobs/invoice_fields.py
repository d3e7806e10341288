"""Nightly invoice field extraction (`conf/jobs/invoice_fields.yaml`).

    python -m jobs.invoice_fields [--set input.path=s3://bucket/...] [--run-id ID]
"""

import sys

from jobs import main_for

if __name__ == "__main__":
    sys.exit(main_for("invoice_fields"))
