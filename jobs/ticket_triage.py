"""Nightly support-ticket triage (`conf/jobs/ticket_triage.yaml`).

    python -m jobs.ticket_triage [--set input.path=s3://bucket/tickets/] [--run-id ID]
"""

import sys

from jobs import main_for

if __name__ == "__main__":
    sys.exit(main_for("ticket_triage"))
