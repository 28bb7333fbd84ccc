"""``DIR/results.parquet``: a Parquet dataset (a folder of part files, one row group each), so that the rows
written so far are always a valid table, whatever stops the job.

Each batch of rows is written to a hidden temporary file and renamed into place, so a part is either complete
or absent (readers skip names starting with "." or "_"); Ray Data writes its own parts into the same folder.
Read it with ``pyarrow.parquet.read_table("DIR/results.parquet")``, ``pandas.read_parquet(...)`` or any engine
that reads a folder of Parquet files.

Resuming: :meth:`ResultStore.done` maps every recorded path to the SHA-256 of the bytes it was computed from;
an input whose bytes are unchanged is skipped, a changed one is recomputed, and :meth:`compact` then keeps only
the newest row of each path (one row per input).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .records import schema

RESULTS_DIR = "results.parquet"


class ResultStore:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.dir = self.out / RESULTS_DIR
        if self.dir.exists() and not self.dir.is_dir():
            from ..errors import InvalidArgumentError
            raise InvalidArgumentError(f"out: {self.dir} exists and is not a folder of Parquet parts; choose "
                                       f"another --out", field="out")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._run = uuid.uuid4().hex[:8]
        self._parts = 0

    def parts(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.parquet") if not p.name.startswith((".", "_")))

    def read(self):
        """Every row written so far (a pyarrow Table with :func:`~zfserve.audit.records.schema`)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        parts = self.parts()
        if not parts:
            return schema().empty_table()
        return pa.concat_tables([pq.read_table(p, schema=schema()) for p in parts])

    def done(self) -> dict[str, str | None]:
        """path -> SHA-256 of its recorded row (None when the file could not be read)."""
        table = self.read()
        return dict(zip(table.column("path").to_pylist(), table.column("sha256").to_pylist()))

    def append(self, rows: list[dict]) -> Path | None:
        """Write ``rows`` as one new part, atomically."""
        if not rows:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq
        self._parts += 1
        name = f"part-{self._run}-{self._parts:05d}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema()), tmp)
        os.replace(tmp, self.dir / name)
        return self.dir / name

    def compact(self) -> int:
        """Keep only the newest row of each path (parts are read in name order, a later run's rows after an
        earlier one's only within a run, so the newest is the one in the most recently written part). Returns
        the number of rows dropped."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        parts = sorted(self.parts(), key=lambda p: p.stat().st_mtime_ns)
        if not parts:
            return 0
        tables = [pq.read_table(p, schema=schema()) for p in parts]
        newest: dict[str, tuple[int, int]] = {}
        for t, table in enumerate(tables):
            for r, path in enumerate(table.column("path").to_pylist()):
                newest[path] = (t, r)
        total = sum(len(t) for t in tables)
        if len(newest) == total:
            return 0
        keep = sorted(newest.values())
        rows = [tables[t].slice(r, 1) for t, r in keep]
        merged = pa.concat_tables(rows)
        name = f"part-{uuid.uuid4().hex[:8]}-compacted.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(merged, tmp)
        os.replace(tmp, self.dir / name)
        for p in parts:   # the compacted part holds every kept row; until this loop ends a reader sees duplicates
            p.unlink()
        return total - len(merged)


__all__ = ["RESULTS_DIR", "ResultStore"]
