"""Nightly review sentiment classification (`conf/jobs/review_sentiment.yaml`).

    python -m jobs.review_sentiment [--set input.path=s3://bucket/...] [--run-id ID]
"""

import sys

from jobs import main_for

if __name__ == "__main__":
    sys.exit(main_for("review_sentiment"))
