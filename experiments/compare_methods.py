"""Fine-tune the same task with several methods and tabulate quality against cost.

    python experiments/compare_methods.py --methods lora,qlora,ia3 --mode demo --out runs/compare
    python experiments/compare_methods.py --config configs/tiny.py --methods lora \
        --set model.name=/path/to/tiny --out /tmp/compare

Each method runs `jft.train` in its own run folder under --out; the table
(Markdown on stdout, CSV in --out/results.csv) has trainable parameters,
zero-shot and final test accuracy, and wall time.
"""

import argparse
import csv
import os

from jft import config as cfg
from jft.train import train


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/sentiment.py")
  parser.add_argument("--methods", default="lora,qlora,ia3,bitfit")
  parser.add_argument("--mode", default="", help="passed as mode=... to the config (e.g. demo, local)")
  parser.add_argument("--set", action="append", default=[], help="FIELD=VALUE override, repeatable")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  overrides = [tuple(s.split("=", 1)) for s in args.set]
  rows = []
  for method in args.methods.split(","):
    arg = f"method={method}" + (f",mode={args.mode}" if args.mode else "")
    config = cfg.build(f"{args.config}:{arg}", overrides)
    result = train(config, os.path.join(args.out, method))
    rows.append({"method": method, "trainable": result["counts"]["trainable"],
                 "percent": round(result["counts"]["percent"], 4),
                 "zero_shot_accuracy": result.get("zero_shot", {}).get("accuracy"),
                 "test_accuracy": result.get("test", {}).get("accuracy"),
                 "test_loss": result.get("test", {}).get("loss"), "seconds": round(result["seconds"], 1)})
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  print("| " + " | ".join(rows[0]) + " |")
  print("|" + "---|" * len(rows[0]))
  for r in rows:
    print("| " + " | ".join("" if v is None else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
  main()
