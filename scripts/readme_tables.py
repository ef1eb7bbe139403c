"""Refill the README's result tables (between <!-- results:NAME --> markers) from
results/h100/NAME.json, so the README shows exactly the committed numbers. (The resnet block
shows only the 3x3 rows of resnet.json and is kept by hand.) The models block comes from
results/h100/models.json (models_results.markdown) once that file exists.

  python scripts/readme_tables.py          (run from the repository root)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sparsert_cli import markdown_table
from sparsert_cli.models_results import load_models, markdown

ROOT = Path(__file__).resolve().parent.parent
DENSE = ["cublas_fp32", "cublas_tf32", "cublas_fp16", "cusparse"]
TABLES = {
    "paper20": (DENSE, DENSE + ["cudnn_fp32", "cudnn_fp16"]),
    "paper20-fp16": (DENSE, DENSE + ["cudnn_fp32", "cudnn_fp16"]),
    "paper20-bf16": (DENSE + ["cublas_bf16"], DENSE + ["cublas_bf16", "cudnn_bf16"]),
    "throughput": (DENSE, DENSE),
}

readme = ROOT / "README.md"
text = readme.read_text()
tables = {name: markdown_table(json.loads((ROOT / "results" / "h100" / f"{name}.json")
                                          .read_text()), times, speedups)
          for name, (times, speedups) in TABLES.items()}
models = load_models(ROOT / "results" / "h100" / "models.json")
if models is not None:
    tables["models"] = markdown(models)
for name, table in tables.items():
    pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n).*?(<!-- /results:{re.escape(name)} -->)",
                         re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- results:{name} --> block")
    text = pattern.sub(lambda m: m.group(1) + table + m.group(2), text)
readme.write_text(text)
print("README tables refreshed:", ", ".join(tables))
