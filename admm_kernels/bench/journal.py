"""The row journal of a benchmark run (``OUT/rows.jsonl``): what makes `--resume` skip finished rows.

Line 1 is a header with the settings every row depends on (Gram cache key, i.e. model weights +
calibration tokens + layers; device; seed; torch thread count); each further line is one finished row
with its "key". Rows are appended and fsync'ed one at a time: rewriting a whole file atomically after
every row would cost O(rows²) for a long run, while an append can at worst leave a torn last line, which
the reader drops (that row is simply recomputed). The header itself is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._io import atomic_write_text, writing

FORMAT = 1
NAME = "rows.jsonl"


class Journal:
    """Finished rows by key. `resume=False` starts a new journal (the old one is replaced)."""

    def __init__(self, folder: str | os.PathLike, settings: dict, resume: bool):
        self.path = Path(folder) / NAME
        self.settings = {"format": FORMAT, **settings}
        self.rows: dict[str, dict] = {}
        if resume and self.path.is_file():
            self._read()
        else:
            with writing("the bench journal", self.path):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.path, json.dumps({"header": self.settings}, sort_keys=True) + "\n")

    def _read(self) -> None:
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0])["header"] if lines else None
        except (ValueError, KeyError, TypeError):
            header = None
        if header is None:
            raise ValueError(f"--resume: {str(self.path)!r} has no valid header; delete it or run without "
                             "--resume")
        diff = sorted(k for k in set(header) | set(self.settings) if header.get(k) != self.settings.get(k))
        if diff:
            detail = "; ".join(f"{k}: saved {header.get(k)!r}, now {self.settings.get(k)!r}" for k in diff)
            raise ValueError(f"--resume: the results in {str(self.path.parent)!r} come from other settings "
                             f"({detail}); use another --out or drop --resume")
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line from an interrupted append: that row is recomputed
            if isinstance(row, dict) and "key" in row:
                self.rows[row["key"]] = row
        # Rewrite without the torn line, so the next append starts on a line of its own.
        with writing("the bench journal", self.path):
            atomic_write_text(self.path, "".join(json.dumps(x, sort_keys=True) + "\n" for x in
                                                  [{"header": self.settings}, *self.rows.values()]))

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        # A row torn by a full disk is dropped by the next --resume, which recomputes it.
        with writing("the bench journal", self.path), open(self.path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
