"""The GPU check: run the device-half tests and whole-model benchmarks on a CUDA GPU, write JSON.

    python scripts/gpu_check.py --model models/synthetic/qwen3moe-30b-a3b-4L-Q8_0.gguf --out gpu-check

Runs, each bounded in time:
  1. the device-half tests (tests/test_device_half.py) with KTLAB_TEST_ACCELERATOR=cuda, and the
     kernel tests (AMX paths included where the CPU has them);
  2. ``ktlab bench`` on --model with --accelerator cuda at each --budgets share of experts on the
     GPU (0: every routed expert on the CPU, the dense part and KV on the GPU), beside the all-CPU
     run and llama.cpp (CPU) in the first table;
and writes ``OUT/gpu_check.json`` (device, CUDA and torch versions, each step's exit status,
output tail and the benchmark rows). Without a visible GPU it says so in one line and exits 2
(``--accelerator torch:cpu`` runs the same steps with the CPU as the device, as a dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    """One step: its command, exit status, seconds and the tail of its output."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status, out = "timeout", (exc.stdout or "") + (exc.stderr or "") if isinstance(exc.stdout, str) else ""
    return {"cmd": " ".join(cmd), "status": status, "seconds": round(time.perf_counter() - t0, 1),
            "tail": out[-4000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="tiny", help="bundled name or GGUF file to benchmark (default tiny)")
    p.add_argument("--out", default="gpu-check", help="directory for gpu_check.json and the bench JSON")
    p.add_argument("--accelerator", default="cuda", choices=["cuda", "torch:cpu"],
                   help="cuda (default), or torch:cpu for a dry run of the same steps on the CPU")
    p.add_argument("--budgets", default="0,15,30,100", help="GPU expert shares in %% (default 0,15,30,100)")
    p.add_argument("--pp", type=int, default=512)
    p.add_argument("--tg", type=int, default=64)
    p.add_argument("--step-timeout", type=float, default=240, help="seconds per step at most (default 240)")
    args = p.parse_args(argv)
    import torch

    if args.accelerator == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "--accelerator torch:cpu runs the same steps on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KTLAB_TEST_ACCELERATOR": args.accelerator}
    py = sys.executable
    report: dict = {
        "accelerator": args.accelerator,
        "device": torch.cuda.get_device_name(0) if args.accelerator == "cuda" else "the CPU (torch:cpu)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "model": args.model, "steps": [],
    }
    report["steps"].append(run([py, "-m", "pytest", "-q", "-x", "tests/test_device_half.py",
                                "tests/test_kernels_mxfp4.py", "tests/test_kernels_kquant.py"], env,
                               args.step_timeout))
    for budget in [int(b) for b in args.budgets.split(",")]:
        json_path = out / f"bench-{budget}.json"
        cmd = [py, "-m", "ktlab", "bench", args.model, "--pp", str(args.pp), "--tg", str(args.tg), "--repeat", "2",
               "--accelerator", args.accelerator, "--budget", str(budget), "--output", str(json_path)]
        if budget != 0:
            cmd.append("--no-peers")
        step = run(cmd, env, args.step_timeout)
        step["budget"] = budget
        if json_path.exists():
            step["results"] = json.loads(json_path.read_text())
        report["steps"].append(step)
        print(f"gpu_check: bench at {budget}%: {step['status']}", file=sys.stderr)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    failed = [s["cmd"] for s in report["steps"] if s["status"] != 0]
    print(f"gpu_check: wrote {out / 'gpu_check.json'}; {len(failed)} of {len(report['steps'])} steps failed",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
