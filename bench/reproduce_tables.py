"""One table from several ``gali reproduce`` outputs (methods run side by side, each in its own out-dir).

python bench/reproduce_tables.py runs/ali/reproduce.json runs/gali4/reproduce.json ... > table.md
"""

import json
import sys
from pathlib import Path

from gali.engine.eval.reproduce import MethodRow, SeedRun, reproduce_table


def rows_of(path: Path) -> list[MethodRow]:
    document = json.loads(path.read_text())
    return [
        MethodRow(
            row["method"],
            row["num_classes"],
            [
                SeedRun(**{**run, "run_dir": Path(run["run_dir"]), "checkpoint": Path(run["checkpoint"])})
                for run in row["runs"]
            ],
        )
        for row in document["rows"]
    ]


if __name__ == "__main__":
    rows = [row for path in sys.argv[1:] for row in rows_of(Path(path))]
    print(reproduce_table(rows, header=f"{len(sys.argv) - 1} reproduce runs: {', '.join(sys.argv[1:])}"))
