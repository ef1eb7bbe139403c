"""The interim H100 cost-model entry: fit to configs/tuned.json, whose entries hold per case the
winner's time and the v2 rule default's (`default_us`). Usage, from the repository root:

    python scripts/costmodel_from_tuned.py configs/paper20.yaml configs/paper20-fp16.yaml \
        configs/resnet.yaml [--write]

A full tuning run supersedes it: `sparsert tunedb calibrate DB --gpu NAME --out
sparsert_cli/data/costmodel.json`."""

import json
import sys

from sparsert_cli import costmodel
from sparsert_cli.build import default_params, geometry_for
from sparsert_cli.config import load_config
from sparsert_cli.families.immediate import PlanParams, estimate, fit_params
from sparsert_cli.patterns import generate, pattern_hash, to_csr
from sparsert_cli.problem_shape import PRECISIONS
from sparsert_cli.tune import TunedDB, shape_key

GPU = "NVIDIA H100 80GB HBM3"
tuned = TunedDB("configs/tuned.json").entries
samples, seen = [], set()
for path in [a for a in sys.argv[1:] if a != "--write"]:
    config = load_config(path)
    for problem, sparsity in config.cases():
        weight = generate(problem, sparsity, config.pattern, config.seed)
        geometry, csr, prec = geometry_for(problem), to_csr(weight), config.precision
        prefix = f"{pattern_hash(weight)}|{shape_key(geometry)}|{GPU}|{prec}|"
        for key, entry in tuned.items():
            if not key.startswith(prefix) or key in seen:
                continue            # a layer in two configs: one entry, counted once
            seen.add(key)
            best = PlanParams.from_dict(entry["params"])
            rule = fit_params(geometry, default_params(geometry, csr.nnz, precision=prec),
                              PRECISIONS[prec][0])
            samples.append((estimate(geometry, csr, best, prec), entry["us"]))
            if entry.get("default_us") and rule != fit_params(geometry, best, PRECISIONS[prec][0]):
                samples.append((estimate(geometry, csr, rule, prec), entry["default_us"]))
coefs, quality = costmodel.fit(samples, 132)
print(json.dumps({"coefficients": coefs, "fit": quality}, indent=1))
if "--write" in sys.argv:
    costmodel.save_entry(costmodel.COEFFICIENTS_PATH, GPU, {
        "sms": 132, "coefficients": {k: float(f"{v:.4g}") for k, v in coefs.items()},
        "fit": {k: round(v, 4) if isinstance(v, float) else v for k, v in quality.items()},
        "source": "interim: fitted to configs/tuned.json by scripts/costmodel_from_tuned.py "
                  f"(paper20 fp32/fp16 + resnet: each case's winner and v2 rule default, "
                  f"{quality['samples']} measurements, H100 runs 3-5); refit with sparsert "
                  f"tunedb calibrate after a full tuning run"})
