#!/usr/bin/env python3
"""Time the dashboard's threshold drag on the tiny model: re-plan + repaint per slider move.

Two measurements: in this process (the Python work alone), and inside a real Jupyter kernel (the
same work plus serializing every figure update into comm messages, as in JupyterLab). The 200 ms
budget is for one move. ``--json PATH`` writes the numbers.

    .venv/bin/python scripts/bench_dashboard.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
SETUP = (
    "from ktlab.lab import Session\n"
    "from ktlab.lab.widgets import Dashboard\n"
    "from ktlab.lab.repaint import time_threshold_drag\n"
    "session = Session('tiny', accelerator='simulated:rtx4090-24g', budget=1.0)\n"
    "session.record()\n"
    "dash = Dashboard(session)\n"
    "display(dash.widget)\n"
)
MEASURE = (
    "import json\n"
    "t = time_threshold_drag(dash, {steps})\n"
    "print(json.dumps({{'times': t.times, 'gpu': t.gpu_experts}}))"
)


def in_process(steps: int) -> dict:
    """Timings in this interpreter (no front end, no comm messages)."""
    from ktlab.lab import Session
    from ktlab.lab.repaint import time_threshold_drag
    from ktlab.lab.widgets import Dashboard

    session = Session("tiny", accelerator="simulated:rtx4090-24g", budget=1.0)
    session.record()
    t = time_threshold_drag(Dashboard(session), steps)
    return {"median_ms": t.median_s * 1e3, "max_ms": t.max_s * 1e3, "gpu_experts": list(t.gpu_experts)}


def in_kernel(steps: int) -> dict:
    """Timings inside a Jupyter kernel (nbclient), widget comm messages included."""
    nb = new_notebook(cells=[new_code_cell(SETUP), new_code_cell(MEASURE.format(steps=steps))])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    out = next(o for o in nb.cells[1].outputs if o.output_type == "stream")
    data = json.loads(out.text.strip().splitlines()[-1])
    times = sorted(data["times"])
    return {"median_ms": times[len(times) // 2] * 1e3, "max_ms": times[-1] * 1e3, "gpu_experts": data["gpu"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="slider moves (default 20)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--no-kernel", action="store_true", help="skip the Jupyter-kernel measurement")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    results = {"in_process": in_process(args.steps)}
    if not args.no_kernel:
        results["in_kernel"] = in_kernel(args.steps)
    for where, r in results.items():
        print(f"{where:<11} threshold move: median {r['median_ms']:.1f} ms, max {r['max_ms']:.1f} ms "
              f"({args.steps} moves, {r['gpu_experts'][0]} -> {r['gpu_experts'][-1]} GPU experts; budget 200 ms)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
