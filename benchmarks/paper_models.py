"""Parameters and GMACs of the paper's six models, beside the paper's Table I.

    python benchmarks/paper_models.py

Builds the teacher and the five students that benchmarks/study_stanford40.json
names (timm, no weights, a 40-class head for Stanford 40, 224 px) and counts:

* parameters, all of them (the head included), in millions;
* GMACs of one forward pass of a (1, 3, 224, 224) input under torch.no_grad(),
  from torch.utils.flop_counter.FlopCounterMode, as its FLOPs / 2.

FlopCounterMode counts matrix multiplications and convolutions only: norms,
activations, softmax, pooling and additions are not counted, so the numbers sit
slightly below counters that include them. Attention's two matmuls are counted
because the forward runs under PyTorch's math attention: on a CPU the fused
kernel that timm otherwise calls is not in the counter's table, which left them
out of PVT-v2 (3.75 instead of 3.89 GMACs) and Twins.

Writes benchmarks/results/paper_models.json and paper_models.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kdcache.models import create_model

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 40  # Stanford 40 Actions
IMG_SIZE = 224

# The paper's Table I parameter counts (M), in the order of the config's teacher and students.
# They are truncated to two decimals, not rounded: ConvNeXt-S has 49.4854 M and is listed as 49.48.
TABLE_I = [("ConvNeXt-S (teacher)", 49.48), ("Swin-v2", 27.59), ("Twins", 23.56), ("MViT-v2", 23.43),
           ("ConViT", 27.36), ("PVT-v2", 22.06)]


def paper_models(config: dict) -> list[tuple[str, str, float]]:
    """(Table I's name, the config's timm model, Table I's params in M) for the teacher and each student."""
    names = [config["teacher"], *config["students"]]
    if len(names) != len(TABLE_I):
        raise SystemExit(f"the config names {len(names)} models; Table I has {len(TABLE_I)}")
    return [(role, name, params) for (role, params), name in zip(TABLE_I, names)]


def measure(name: str) -> dict:
    """Parameters (M) and forward GMACs of `name` with a 40-class head at 224 px."""
    model = create_model(name, NUM_CLASSES, IMG_SIZE).eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, IMG_SIZE, IMG_SIZE))
    return {"params": params, "params_m": params / 1e6, "gmacs": counter.get_total_flops() / 2 / 1e9}


def write_markdown(rows: list[dict], command: str, path: Path) -> None:
    lines = ["# The paper's models: parameters and GMACs", "",
             f"Command: `{command}`", "",
             (f"timm {rows[0]['timm_version']}, no weights, {NUM_CLASSES}-class head, {IMG_SIZE} px. GMACs: "
              "`torch.utils.flop_counter.FlopCounterMode` FLOPs / 2 for one forward pass of one image under "
              "`torch.no_grad()`, math attention; it counts matmuls and convolutions only (not norms, "
              "activations or softmax). The Table I column is the paper's parameter count (ours truncated to two "
              "decimals, not rounded, gives it for every model); the GMACs are ours."), "",
             "| Table I | timm model | params (M) | Table I params (M) | ours - Table I | GMACs |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['paper_name']} | `{r['model']}` | {r['params_m']:.4f} | {r['paper_params_m']:.2f} | "
              f"{r['params_m'] - r['paper_params_m']:+.4f} | {r['gmacs']:.2f} |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="benchmarks/study_stanford40.json")
    parser.add_argument("--out", default="benchmarks/results/paper_models")
    args = parser.parse_args()
    import timm

    config = json.loads((ROOT / args.config).read_text())
    torch.manual_seed(0)
    rows = []
    for paper_name, name, paper_params in paper_models(config):
        start = time.perf_counter()
        rows.append({"paper_name": paper_name, "model": name, **measure(name), "paper_params_m": paper_params,
                     "num_classes": NUM_CLASSES, "img_size": IMG_SIZE, "timm_version": timm.__version__,
                     "torch_version": torch.__version__})
        print(f"{name}: {rows[-1]['params_m']:.4f} M, {rows[-1]['gmacs']:.2f} GMACs "
              f"({time.perf_counter() - start:.1f} s)")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    write_markdown(rows, "python benchmarks/paper_models.py", out.with_suffix(".md"))


if __name__ == "__main__":
    main()
