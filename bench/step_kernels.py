#!/usr/bin/env python3
"""Where a decode step's time goes, kernel by kernel, under Nsight Compute (the GPU machine's ncu).

usage: bench/step_kernels.py PATH/TO/loom_model_bench MODEL_DIR [--batch 64] [--prompt 384]
                             [--quantizer int8] [--csv F]

Runs `ncu --clock-control none --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum` over
`loom_model_bench MODEL_DIR --attention flash --batches B --prompt P --new 3 --reps 1`, takes the
last complete decode step (the kernels after the second-to-last greedy argmax up to the last)
and prints per kernel name: launches,
microseconds summed and each, bytes read from DRAM and that rate. Nsight runs each kernel alone
after flushing the caches, so the sum is above the step's real time in its CUDA graph (which
overlaps launches and hits L2); the shares are what this is for (BENCHMARKS.md, session 25).
"""
import argparse
import collections
import csv
import io
import re
import subprocess
import sys

UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
         "byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench")
    ap.add_argument("model_dir")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=384)
    ap.add_argument("--quantizer")
    ap.add_argument("--csv", help="also write ncu's CSV here")
    a = ap.parse_args()
    cmd = ["ncu", "--clock-control", "none", "--csv", "--metrics", "gpu__time_duration.sum,dram__bytes_read.sum",
           a.bench, a.model_dir, "--attention", "flash", "--batches", str(a.batch), "--prompt", str(a.prompt),
           "--new", "3", "--reps", "1"] + (["--quantizer", a.quantizer] if a.quantizer else [])
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stderr[-4000:])
        sys.exit(f"ncu exited with {run.returncode}")
    text = "".join(line + "\n" for line in run.stdout.splitlines() if line.startswith('"'))
    if a.csv:
        with open(a.csv, "w") as f:
            f.write(text)
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2:
        sys.exit("ncu printed no kernels")
    head, rows = rows[0], rows[1:]
    col = {name: head.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")}
    kernels = collections.OrderedDict()
    for r in rows:
        k = kernels.setdefault(int(r[col["ID"]]), {"name": r[col["Kernel Name"]]})
        k[r[col["Metric Name"]]] = float(r[col["Metric Value"]].replace(",", "")) * UNITS.get(r[col["Metric Unit"]], 1.0)
    ks = list(kernels.values())
    ends = [i for i, k in enumerate(ks) if "argmax" in k["name"]]  # greedy sampling ends each step
    if len(ends) < 2:
        sys.exit("fewer than two decode steps (argmax launches) in ncu's output")
    step = ks[ends[-2] + 1:ends[-1] + 1]
    by_name = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for k in step:
        name = re.sub(r"\(.*", "", k["name"]).strip()[:90]
        e = by_name[name]
        e[0] += 1
        e[1] += k.get("gpu__time_duration.sum", 0.0)
        e[2] += k.get("dram__bytes_read.sum", 0.0)
    total = sum(e[1] for e in by_name.values())
    print(f"decode step at batch {a.batch}, prompt {a.prompt}{', ' + a.quantizer if a.quantizer else ''}: "
          f"{len(step)} kernels, {total:.1f} us summed (Nsight, each kernel alone from a cold L2)")
    print("| kernel | launches | us summed | us each | MB read | TB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (n, us, mb) in sorted(by_name.items(), key=lambda x: -x[1][1]):
        print(f"| {name} | {n} | {us:.1f} | {us / n:.2f} | {mb:.1f} | {mb / us if us else 0:.2f} |")


if __name__ == "__main__":
    main()
