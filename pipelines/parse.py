"""Parse: turn the engine's raw output into the record's result.

For free-text jobs the text is the result; what needs parsing is how the
generation ended: an aborted request is an error, a length cut-off is not.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def parse_batch(batch: pa.Table) -> pa.Table:
    """Mark aborted generations as errors; one row out per row in."""
    finish = batch.column("finish_reason")
    error = batch.column("error")
    aborted = pc.fill_null(pc.equal(finish, "abort"), False)
    error = pc.if_else(pc.and_(aborted, pc.is_null(error)), pa.scalar("engine: request aborted"), error)
    return batch.set_column(batch.schema.get_field_index("error"), "error", error)
