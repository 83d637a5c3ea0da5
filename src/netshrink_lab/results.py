"""Writing a benchmark's result JSON, in one place: `write_result` writes it (after every
row, so a partial run leaves its rows) and, once the run is finished, adds the peak RSS
and the load average at the end."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any


def write_result(directory: Path, name: str, result: dict[str, Any], *,
                 finished: bool = False) -> None:
    """Write `result` to directory/name (indented JSON); finished=True first adds
    "peak_rss_gib" and "load_average_end" to it."""
    if finished:
        result["peak_rss_gib"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        result["load_average_end"] = os.getloadavg()
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(json.dumps(result, indent=2) + "\n")
