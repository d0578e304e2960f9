"""Our multi-scale deformable attention core against an independent pure-PyTorch one: Hugging Face
transformers' Deformable DETR attention (``MultiScaleDeformableAttention`` in
``transformers.models.deformable_detr``), forward and backward, at digits-det (128 px) and COCO (800 x 1333)
level sizes.

    python benchmarks/msda_compare.py [--reps 7] [--threads 1] [--before REV] [--doc docs/benchmarks.md]

transformers is not a dependency of unikd: run by a Python that lacks it, the script makes its own virtual
environment ``.venv-bench`` (git-ignored; torch and torchvision from the same local wheels as the Makefile,
unikd itself, transformers from the package index) and runs itself again there.

Per case: the same random inputs for both (float32), outputs and the three input gradients compared, then
``--reps`` interleaved repetitions (each implementation first in turn) of a forward pass and of a backward
pass of a fixed upstream gradient, timed in CPU seconds of the process; the table gives the medians and, paired
within each repetition (the two ran back to back, under the same load), the median and interquartile range of
ours / theirs over the repetitions. ``--before REV`` adds our
core as it was at git revision ``REV`` (read with ``git show``) to the same interleaved run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"


def ensure_transformers() -> None:
    """Re-run this script in ``.venv-bench`` (made on first use) unless transformers imports here."""
    try:
        import transformers  # noqa: F401
        return
    except ImportError:
        pass
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.14.1", "torchvision==0.29.1"], check=True)
        subprocess.run([*pip, "-e", str(ROOT), "transformers"], check=True)
    os.execv(str(python), [str(python), *sys.argv])


ensure_transformers()

import torch  # noqa: E402
import transformers  # noqa: E402
from doc_sections import replace_section  # noqa: E402
from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention  # noqa: E402

from unikd.transformer import ms_deform_attn  # noqa: E402

STRIDES = (8, 16, 32, 64, 128)  # a P3-P7 pyramid, as RetinaNet's and FCOS's


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Level sizes of a P3-P7 pyramid for an ``height x width`` input (each stride halving, rounded up)."""
    return [(-(-height // s), -(-width // s)) for s in STRIDES]


# (name, image size, batch, queries (None: one per token, as φ's self-attention), channels, heads, points)
CASES = [
    ("digits-det, φ self-attention", (128, 128), 8, None, 128, 8, 4),
    ("digits-det, AKE cross-attention", (128, 128), 8, 100, 128, 8, 4),
    ("COCO, φ self-attention", (800, 1333), 1, None, 256, 8, 4),
    ("COCO, AKE cross-attention", (800, 1333), 2, 200, 256, 8, 4),
]


def inputs(shapes, batch: int, queries: int | None, channels: int, heads: int, points: int, seed: int = 0):
    """``value [B, S, M, D]``, ``locations [B, Q, M, L, P, 2]`` (some off the map), ``weights [B, Q, M, L, P]``
    (softmax over each head's ``L * P``) and an upstream gradient ``[B, Q, M * D]``, all float32."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in shapes)
    q = tokens if queries is None else queries
    m, d, lv = heads, channels // heads, len(shapes)
    value = torch.randn(batch, tokens, m, d, generator=g)
    locations = torch.rand(batch, q, m, lv, points, 2, generator=g) * 1.2 - 0.1
    weights = torch.randn(batch, q, m, lv * points, generator=g).softmax(-1).view(batch, q, m, lv, points)
    grad = torch.randn(batch, q, m * d, generator=g)
    return value, locations, weights, grad


def ours(shapes):
    shapes_t = torch.tensor(shapes)
    return lambda v, loc, w: ms_deform_attn(v, shapes_t, loc, w)


def theirs(shapes):
    attn, shapes_t = MultiScaleDeformableAttention(), torch.tensor(shapes)
    starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    return lambda v, loc, w: attn(v, shapes_t, shapes, starts, loc, w, 64)


def ours_at(rev: str, shapes):
    """Our core as it was at git revision ``rev``."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/unikd/transformer/msda.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"msda_at_{rev}")
    exec(compile(source, f"{rev}:msda.py", "exec"), module.__dict__)
    shapes_t = torch.tensor(shapes)
    return lambda v, loc, w: module.ms_deform_attn(v, shapes_t, loc, w)


def run_case(impl, value, locations, weights, grad) -> tuple[float, float, list[torch.Tensor]]:
    """CPU seconds of this process for one forward pass and for its backward pass (``time.process_time``: on a
    shared machine the time others take from us does not count), and ``[output, grad value, grad locations,
    grad weights]``."""
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    start = time.process_time()
    out = impl(*leaves)
    middle = time.process_time()
    out.backward(grad)
    end = time.process_time()
    return middle - start, end - middle, [out.detach(), *(t.grad for t in leaves)]


def compare(case, reps: int, before: str | None) -> dict:
    name, (height, width), batch, queries, channels, heads, points = case
    shapes = level_shapes(height, width)
    data = inputs(shapes, batch, queries, channels, heads, points)
    impls = {"ours": ours(shapes), "theirs": theirs(shapes)}
    if before:
        impls["before"] = ours_at(before, shapes)
    results = {key: run_case(impl, *data) for key, impl in impls.items()}  # also the warm-up
    diff = {key: max((a - b).abs().max().item() for a, b in zip(results[key][2], results["theirs"][2]))
            for key in impls}
    times = {key: ([], []) for key in impls}
    order = list(impls)
    for rep in range(reps):
        for key in order[rep % len(order):] + order[:rep % len(order)]:  # each goes first in turn
            fwd, bwd, _ = run_case(impls[key], *data)
            times[key][0].append(fwd)
            times[key][1].append(bwd)
    med = {key: [statistics.median(t) for t in pair] for key, pair in times.items()}
    ratios = {f"{key}/theirs": [paired_ratio(times[key][i], times["theirs"][i]) for i in (0, 1)]
              for key in impls if key != "theirs"}
    q = sum(h * w for h, w in shapes) if queries is None else queries
    return {"name": name, "size": f"{height} x {width}", "batch": batch, "queries": q,
            "tokens": sum(h * w for h, w in shapes), "max_diff": diff, **med, **ratios}


def paired_ratio(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """Median, first and third quartile of ``ours[i] / theirs[i]`` over the repetitions ``i``."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high


def section(rows: list[dict], command: str, reps: int, before: str | None) -> str:
    lines = [
        "## MSDA core against an independent implementation", "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}, CPU ({os.cpu_count()} cores), torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch thread(s), transformers {transformers.__version__}  ",
        "Ours: `unikd.transformer.ms_deform_attn`; theirs: transformers' `MultiScaleDeformableAttention` (its "
        "pure-PyTorch path, in `.venv-bench`, not a unikd dependency). Float32, P3-P7 levels of the image size, "
        "8 heads, 4 points; the same inputs and upstream gradient for both. Times: medians of "
        f"{reps} interleaved repetitions, CPU seconds of the process (`time.process_time`); max |diff|: over the output and the gradients of value, "
        "locations and weights." + (f" Before: our core at `{before}`." if before else ""), "",
        "| case | image | batch | queries | tokens | max abs diff | fwd ours | fwd theirs | fwd ours/theirs (IQR) "
        "| bwd ours | bwd theirs | bwd ours/theirs (IQR) |"
        + (" fwd before/theirs | bwd before/theirs |" if before else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if before else ""),
    ]
    for r in rows:
        (fo, bo), (ft, bt) = r["ours"], r["theirs"]
        fr, br = (f"{m:.2f} ({lo:.2f}–{hi:.2f})" for m, lo, hi in r["ours/theirs"])
        line = (f"| {r['name']} | {r['size']} | {r['batch']} | {r['queries']} | {r['tokens']} | "
                f"{r['max_diff']['ours']:.1e} | {fo:.4f} | {ft:.4f} | {fr} | {bo:.4f} | {bt:.4f} | {br} |")
        if before:
            line += " " + " | ".join(f"{m:.2f}" for m, _, _ in r["before/theirs"]) + " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="*", type=int, help="indices into the case list (default: all)")
    parser.add_argument("--before", help="also time our core as it was at this git revision")
    parser.add_argument("--doc", type=Path, help="write the section into this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/msda_compare.py " + " ".join(sys.argv[1:])
    cases = [CASES[i] for i in args.cases] if args.cases else CASES
    rows = []
    for case in cases:
        rows.append(compare(case, args.reps, args.before))
        print(section(rows[-1:], command, args.reps, args.before).splitlines()[-1], flush=True)
    text = section(rows, command.strip(), args.reps, args.before)
    print(text)
    if args.doc:
        replace_section(args.doc, text)


if __name__ == "__main__":
    main()
