"""Write the batch_inference example: a tiny model's weights, an input tensor, the job.

    python examples/batch_job.py [OUT_DIR]

writes to OUT_DIR (by default ``examples/batch``):

- ``mlp.safetensors``: random (seeded) weights of the built-in ``mlp`` architecture,
  8 features in, 3 out;
- ``inputs.npz``: 64 samples of 8 features under the key ``inputs``;
- ``batch-inference-job.json``: the job, naming both files by absolute path and sha256.

The job file is written rather than kept in the repository because a local input is
named by an absolute path (a relative one would be relative to the job's own work
dir), and the job sandbox sees it only inside this checkout (or another folder it
binds in); on a real network the coordinator names http(s) URLs with their sha256
instead. It takes about a second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "batch"
FEATURES, HIDDEN, OUTPUTS, SAMPLES = 8, 16, 3, 64
MLP_CONFIG = {"in_features": FEATURES, "hidden": [HIDDEN], "out_features": OUTPUTS}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out_dir: Path, seed: int = 0) -> Path:
    """Write the weights, the inputs and the job file; returns the job file's path."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from torch import nn

    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # The layout runtimes/models.py builds for this config (Linear, ReLU, Linear), so the
    # state dict's names (0.weight, ..., 2.bias) are the ones the runtime loads.
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUTPUTS))
    weights, inputs = out_dir / "mlp.safetensors", out_dir / "inputs.npz"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    rng = np.random.default_rng(seed)
    np.savez(inputs, inputs=rng.standard_normal((SAMPLES, FEATURES), dtype=np.float32))
    job = {
        "job_id": "sample-batch",
        "payload": {
            "type": "batch_inference",
            "model": {"format": "builtin", "arch": "mlp", "config": MLP_CONFIG,
                      "weights": {"uri": str(weights), "sha256": _sha256(weights)}},
            "inputs": {"uri": str(inputs), "sha256": _sha256(inputs), "key": "inputs"},
            "batch_size": 16,
            "batches_per_part": 2,
        },
        "constraints": {"timeout_s": 60},
    }
    job_file = out_dir / "batch-inference-job.json"
    job_file.write_text(json.dumps(job, indent=2) + "\n")
    return job_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT,
                        help=f"where the files go (default: {DEFAULT_OUT})")
    args = parser.parse_args()
    print(f"batch job written to {build(args.out_dir)}")


if __name__ == "__main__":
    main()
