"""Coverage: which timm CNN families this library prunes, how much of them, exactly, and reloadably.

For each family (its smallest variant, random init, ``pretrained=False``, 10 classes) at a small
input: binarise (every conv but the first, :func:`~lightning_bnnprune.binarize.binarize_model`),
trace the channel groups, close a seeded random ``--pfr`` of every prunable group (the budget's
uniform allocation, equal counts per conv group where a grouped conv needs them: what
``GreedyFilterPruning(criterion="random")`` does), remove the closed filters
(:func:`~lightning_bnnprune.pruning.surgery.remove_filters`, which checks that the pruned logits
equal the gated ones), save the pruned model, reload it from its record alone
(:func:`~lightning_bnnprune.pruning.record.load_pruned`) and compare its logits. Batch norms get
random statistics first, layer norms random affine terms and layer scales (``gamma``, initialised
near 0) values near 1, so a wrong cut shows in the logits.

Per family: the prunable share of the binary filters, the PFR over the prunable groups and over
**all** binary filters, the exactness (max |logit difference|), the reload, the seconds, and each
refused group's reason. With ``--lce``, also the pruned network exported for Larq Compute Engine
(:func:`~lightning_bnnprune.pruning.export_lce.export_lce`), run by LCE's interpreter on 64 seeded
inputs and compared with PyTorch (top-1 agreement, max |logit difference|), or the exporter's
one-line refusal naming the layer (the table gets an LCE column; needs the ``lce`` extra and, under
numpy 2, ``BNNPRUNE_LCE_PYTHON``). Grouped binary convs are exported with ``grouped="float"`` (float
convolutions of the +-1 tensors; the column counts them). Resumable: families already in ``--out``'s JSON are skipped; each family
is written as soon as it ends.

Example::

    nice -n 10 python benchmarks/coverage.py --out benchmarks/results/coverage
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import timm
import torch
from torch import nn

from lightning_bnnprune import (
    binarize_model,
    compression_report,
    find_channel_groups,
    load_pruned,
    remove_filters,
    save_pruned,
)
from lightning_bnnprune.pruning.allocation import allocate
from lightning_bnnprune.pruning.criteria import RandomScore
from lightning_bnnprune.pruning.groups import coverage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _report
from _report import git_commit  # noqa: E402

# (family, smallest model, designs it covers); input 64x64 unless INPUT says otherwise.
FAMILIES: List[Tuple[str, str, str]] = [
    ("ResNet", "resnet10t", "plain residual"),
    ("ResNet-D", "resnet18d", "avg-pool shortcut"),
    ("ResNet-T", "resnet26t", "deep stem, tiered"),
    ("ResNeXt", "resnext26ts", "grouped"),
    ("SE-ResNeXt", "seresnext26d_32x4d", "grouped, SE"),
    ("Legacy SENet", "legacy_seresnet18", "SE"),
    ("RegNetX", "regnetx_002", "grouped"),
    ("RegNetY", "regnety_002", "grouped, SE"),
    ("RegNetZ", "regnetz_005", "grouped, SE, inverted"),
    ("Wide/SK ResNet", "skresnet18", "selective kernel (split-attention)"),
    ("ResNeSt", "resnest14d", "grouped split-attention (radix)"),
    ("Res2Net", "res2net50_14w_8s", "split/concat (hierarchical)"),
    ("Res2NeXt", "res2next50", "split/concat, grouped"),
    ("DenseNet", "densenet121", "concat"),
    ("DPN", "dpn48b", "dual-path (add + concat), grouped"),
    ("DPN (no b)", "dpn68", "dual-path, one conv makes residual and dense parts"),
    ("DLA", "dla34", "aggregation (concat)"),
    ("DLA-X", "dla46x_c", "aggregation, grouped"),
    ("CSPResNet", "cspresnet50", "cross-stage split/concat"),
    ("CSPResNeXt", "cspresnext50", "cross-stage, grouped"),
    ("CS3DarkNet", "cs3darknet_s", "cross-stage split/concat"),
    ("DarkNet", "darknet17", "plain residual"),
    ("VoVNet", "ese_vovnet19b_slim_dw", "one-shot concat, eSE, depthwise"),
    ("SelecSLS", "selecsls42b", "concat"),
    ("HGNetV2", "hgnetv2_b0", "light aggregation (concat)"),
    ("HRNet", "hrnet_w18_small", "multi-resolution branches"),
    ("Inception-v3", "inception_v3", "multi-branch concat"),
    ("Xception", "xception41", "separable (depthwise)"),
    ("MobileNetV1", "mobilenetv1_100", "depthwise"),
    ("MobileNetV2", "mobilenetv2_035", "depthwise, inverted residual"),
    ("MobileNetV3", "mobilenetv3_small_050", "depthwise, SE, hard-swish"),
    ("MobileNetV4", "mobilenetv4_conv_small", "universal inverted bottleneck"),
    ("EfficientNet", "efficientnet_b0", "depthwise, SE"),
    ("EfficientNet-Lite", "efficientnet_lite0", "depthwise"),
    ("EfficientNetV2", "tf_efficientnetv2_b0", "fused MBConv, same padding"),
    ("TinyNet", "tinynet_e", "depthwise, SE"),
    ("MnasNet", "mnasnet_small", "depthwise"),
    ("SemnasNet", "semnasnet_050", "depthwise, SE"),
    ("FBNet", "fbnetc_100", "depthwise"),
    ("FBNetV3", "fbnetv3_b", "depthwise, SE"),
    ("SPNASNet", "spnasnet_100", "depthwise"),
    ("HardCoReNAS", "hardcorenas_a", "depthwise, SE"),
    ("MixNet", "mixnet_s", "mixed-kernel split depthwise"),
    ("LCNet", "lcnet_050", "depthwise, SE"),
    ("ReXNet", "rexnet_100", "partial residual (channel-padded add)"),
    ("GhostNet", "ghostnet_050", "ghost (cheap op + concat)"),
    ("GhostNetV2", "ghostnetv2_100", "ghost, attention gate"),
    ("RepGhostNet", "repghostnet_050", "re-parameterisable ghost"),
    ("RepVGG", "repvgg_a0", "re-parameterisable"),
    ("MobileOne", "mobileone_s0", "re-parameterisable, depthwise"),
    ("GENet", "gernet_s", "byobnet"),
    ("ECA-ResNet", "eca_resnet33ts", "ECA channel attention"),
    ("GC-ResNet", "gcresnet33ts", "global context"),
    ("NF-ResNet", "nf_resnet26", "normalisation-free"),
    ("NF-RegNet", "nf_regnet_b0", "normalisation-free, grouped, SE"),
    ("NF-SEResNet", "nf_seresnet26", "normalisation-free, SE"),
    ("ResNetV2", "resnetv2_50", "pre-activation"),
    ("ResNetV2-D", "resnetv2_50d", "pre-activation, avg-down"),
    ("ResNet-Blur", "resnetblur18", "anti-aliased downsampling"),
    ("ResNet-AA", "resnetaa34d", "anti-aliased downsampling"),
    ("FastViT", "fastvit_t8", "re-parameterisable token mixer"),
    ("ConvNeXt", "convnext_atto", "LayerNorm, depthwise"),
]
INPUT = {"inception_v3": 96}
CODE = ("lightning_bnnprune", "benchmarks/coverage.py")  # what the table's commit label vouches for


class _Timeout(BaseException):  # not an Exception: library code that catches those must not swallow it
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _binary_net(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, num_classes=10)
    binarize_model(net)
    with torch.no_grad():  # random statistics: a wrong cut changes the logits
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.normal_(1.0, 0.3)
                    m.bias.normal_(0.0, 0.3)
            if isinstance(m, nn.Conv2d) and m.bias is not None:  # zeros at init: sums of 0 tie at the sign
                m.bias.normal_(0.0, 0.3)
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
        for n, p in net.named_parameters():
            if n.rpartition(".")[2] == "gamma":  # layer scales start near 0 (1e-6), hiding every residual branch
                p.uniform_(0.5, 1.5)
    return net.eval()


LCE_INPUTS = 64
LCE_OFF = 1e-3  # an input whose logits differ more than this: a bit flipped somewhere (see lce_export.md)


def lce_check(net: nn.Module, size: int, seed: int, workdir: str) -> Dict[str, Any]:
    """The pruned ``net`` exported for LCE and run on :data:`LCE_INPUTS` seeded inputs: top-1
    agreement and max |logit difference| with PyTorch, or the exporter's refusal."""
    from lightning_bnnprune.pruning.export_lce import LceExportError, export_lce, lce_predict

    path = os.path.join(workdir, "lce.tflite")
    try:
        info = export_lce(net, path, input_size=(3, size, size), grouped="float")
    except LceExportError as err:
        return dict(status="refused", message=str(err).splitlines()[0].split("; supported:")[0][:200])
    x = torch.randn(LCE_INPUTS, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        reference = net(x)
    try:
        out = torch.from_numpy(lce_predict(path, x))
    except RuntimeError as err:  # LCE's interpreter failed to load or run the file
        return dict(status="error", message=str(err).splitlines()[0][:200])
    per_input = (out - reference).abs().amax(1)
    return dict(status="ok", top1_agreement=float((out.argmax(1) == reference.argmax(1)).float().mean()),
                max_abs_diff=float(per_input.max()), inputs_off=int((per_input > LCE_OFF).sum()),
                binary_layers=info["binary_layers"],
                float_binary_layers=info["float_binary_layers"])


def run_family(name: str, size: int, pfr: float, seed: int, workdir: str, lce: bool = False) -> Dict[str, Any]:
    """One family: the row of the table (see the module docstring); ``lce``: add :func:`lce_check`."""
    start = time.perf_counter()
    net = _binary_net(name, seed)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    analysis = find_channel_groups(net, x[:1])
    cov = coverage(net, analysis)
    row: Dict[str, Any] = dict(
        binary_filters=cov.binary_filters, prunable_share=cov.share, groups=len(analysis.groups),
        refused_groups=len(analysis.refused), refused=cov.refused,
        refused_examples={why: next(k for k, v in analysis.refused.items() if v.split(": ", 1)[-1] == why)
                          for why in cov.refused},
        grouped_groups=sum(1 for g in analysis.groups if g.num_parts > 1),
    )
    names = [g.name for g in analysis.groups if g.capacity() > 0]
    if not names:
        row.update(status="nothing prunable", seconds=time.perf_counter() - start)
        return row
    counts = allocate({n: analysis[n].size for n in names}, pfr, "uniform", total_filters=analysis.num_filters,
                      quanta={n: analysis[n].num_parts for n in names})
    score = RandomScore(seed)
    masks = {n: ~analysis[n].keep_top(-score(net, analysis[n]), counts[n]) for n in names}
    try:
        record = remove_filters(net, analysis, masks=masks, example_inputs=x)
        exact = True
    except RuntimeError as err:
        row.update(status="not exact", error=str(err)[:300], seconds=time.perf_counter() - start)
        return row
    report = compression_report(net, record)
    path = save_pruned(net, record, os.path.join(workdir, f"{name}.pt"))
    loaded = load_pruned(path)
    with torch.no_grad():
        reload_diff = float((loaded(x) - net(x)).abs().max())
    row.update(
        status="ok", exact=exact, max_abs_diff=record.max_abs_diff, group_pfr=record.pfr,
        binary_pfr=report.summary["binary_pfr"], params_before=record.params_before,
        params_after=record.params_after, reloaded=reload_diff == 0.0, reload_diff=reload_diff,
    )
    if lce:
        row["lce"] = lce_check(net, size, seed, workdir)
    row["seconds"] = time.perf_counter() - start
    return row


def _fmt_refused(row: Dict[str, Any]) -> str:
    return "; ".join(f"{n} x {why} (e.g. `{row['refused_examples'][why]}`)"
                     for why, n in sorted(row.get("refused", {}).items(), key=lambda kv: -kv[1])) or ""


def _fmt_lce(row: Dict[str, Any]) -> str:
    lce = row.get("lce")
    if lce is None:
        return "–"
    if lce["status"] == "ok":
        grouped, off = lce.get("float_binary_layers", 0), lce.get("inputs_off", 0)
        return (f"{lce['top1_agreement']:.0%} top-1 ({lce['max_abs_diff']:.0e}"
                + (f"; {off}/{LCE_INPUTS} inputs off by > {LCE_OFF:.0e}" if off else "") + ")"
                + (f"; grouped: {grouped} of {grouped + lce['binary_layers']} binary convs as float" if grouped else ""))
    return f"{lce['status']}: {lce['message']}".replace("|", "/")


def write_markdown(path: str, results: Dict[str, Any], meta: Dict[str, Any]) -> None:
    rows = [r for r in results.values()]
    with_lce = any("lce" in r for r in rows)  # the column appears once a run used --lce
    ok = [r for r in rows if r.get("status") == "ok" and r.get("exact") and r.get("reloaded")]
    pruned = [r for r in rows if r.get("status") in ("ok", "not exact")]
    lines = [
        "# Coverage over timm CNN families",
        "",
        f"Binarise -> random {meta['pfr']:.0%} of every prunable channel group -> removal -> exactness -> reload,"
        f" one family at a time (smallest variant, random init, {meta['size']}x{meta['size']} input unless noted, "
        "batch norms with random statistics).",
        "",
        *[f"- command: `{run['command']}` at commit `{run['commit']}`" for run in meta.get("runs", [meta])],
        f"- torch {meta['torch']}, timm {meta['timm']}; {meta['machine']}; each row's commit is in the JSON",
        f"- families: {len(rows)}; exact and reloaded: **{len(ok)}/{len(rows)}** "
        f"({len(ok) / max(len(rows), 1):.0%}); of the {len(pruned)} with something prunable: "
        f"{len(ok)}/{len(pruned)}",
        "- *prunable share*: binary filters in prunable groups / all binary filters; *PFR (groups)*: pruned / "
        "prunable group channels; *PFR (all binary)*: pruned / all binary filters (the figure a user sees); "
        "*groups (equal-count)*: prunable groups, in brackets those that lose equal counts per cell (they feed "
        "a grouped conv or a split into equal parts); *exact*: max |logits pruned - logits gated|; *reload*: logits of the model rebuilt from its record "
        "equal (bit for bit) those of the pruned one. Seconds on a shared 2-core machine (1 thread, niced)."
        + (f" *LCE* (runs with `--lce`): the pruned network exported for Larq Compute Engine, run by its "
           f"interpreter on {LCE_INPUTS} seeded inputs: top-1 agreement with PyTorch (max |logit difference|: "
           f"inputs off by more than {LCE_OFF:.0e} are counted; traced node by node in DenseNet and ResNetV2, "
           "each is one pre-activation within 1e-6 of 0 that takes the other sign under LCE's rounding and flips "
           "a bit, see `lce_export.md`), or the exporter's refusal naming the layer; – where not run. Grouped binary "
           "convs (depthwise included), which LCE's `LceBconv2d` runs only on one kernel path and only with "
           "32-channel groups, are written as float convolutions of the ±1 tensors (`export_lce(grouped=\"float\")`): "
           "exact, but float arithmetic; the cell counts them." if with_lce else ""),
        "",
        "| family | model | design | input | binary filters | prunable share | groups (equal-count) "
        "| PFR (groups) | PFR (all binary) | exact | reload | s | refused groups: reason |" + (" LCE |" if with_lce else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_lce else ""),
    ]
    for fam, model, design in FAMILIES:
        r = results.get(model)
        if r is None:
            continue
        size = INPUT.get(model, meta["size"])
        if r.get("status") == "error":
            lines.append(f"| {fam} | `{model}` | {design} | {size} | | | | | | error | | {r.get('seconds', 0):.0f} "
                         f"| {r['error'][:160]} |" + (" – |" if with_lce else ""))
            continue
        exact = (f"{r['max_abs_diff']:.0e}" if r.get("status") == "ok" else
                 ("no" if r.get("status") == "not exact" else "–"))
        reload = "yes" if r.get("reloaded") else ("no" if r.get("status") == "ok" else "–")
        gp = f"{r['group_pfr']:.1%}" if "group_pfr" in r else "–"
        bp = f"{r['binary_pfr']:.1%}" if "binary_pfr" in r else "–"
        lines.append(
            f"| {fam} | `{model}` | {design} | {size} | {r['binary_filters']} | {r['prunable_share']:.1%} "
            f"| {r['groups']} ({r['grouped_groups']}) | {gp} | {bp} | {exact} | {reload} | {r['seconds']:.0f} "
            f"| {_fmt_refused(r)} |" + (f" {_fmt_lce(r)} |" if with_lce else "")
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/coverage", help="stem of the .json and .md results")
    parser.add_argument("--pfr", type=float, default=0.4, help="share of every prunable group to close")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per family before it is an error")
    parser.add_argument("--only", nargs="*", default=None, help="models to run (default: every family)")
    parser.add_argument("--redo", action="store_true", help="rerun families already in the JSON")
    parser.add_argument("--lce", action="store_true",
                        help="also export each pruned network for LCE and compare its top-1 with PyTorch's")
    args = parser.parse_args(argv)
    if not 0.0 < args.pfr < 1.0:
        parser.error(f"--pfr must be in (0, 1), got {args.pfr}")
    known = [m for _, m, _ in FAMILIES]
    unknown = [m for m in args.only or [] if m not in known]
    if unknown:
        parser.error(f"--only: unknown models {unknown}; known: {', '.join(known)}")
    torch.set_num_threads(args.threads)
    json_path, md_path = args.out + ".json", args.out + ".md"
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    results: Dict[str, Any] = {}
    runs: List[Dict[str, str]] = []
    if os.path.exists(json_path):
        with open(json_path) as f:
            saved = json.load(f)
        results = saved.get("families", {})
        runs = saved.get("meta", {}).get("runs", [])
    meta = dict(pfr=args.pfr, size=args.size, seed=args.seed, commit=git_commit(CODE), torch=torch.__version__,
                timm=timm.__version__, machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                command="nice -n 10 python " + " ".join(shlex.quote(a) for a in ["benchmarks/coverage.py", *sys.argv[1:]]))
    meta["runs"] = runs + [dict(command=meta["command"], commit=meta["commit"])]  # a resumed table has several
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as workdir:
        for fam, model, _ in FAMILIES:
            if (args.only and model not in args.only) or (model in results and not args.redo):
                continue
            start = time.perf_counter()
            signal.alarm(args.timeout)
            try:
                row = run_family(model, INPUT.get(model, args.size), args.pfr, args.seed, workdir, lce=args.lce)
            except _Timeout:
                row = dict(status="error", error=f"timed out after {args.timeout} s", seconds=time.perf_counter() - start)
            except Exception as err:  # noqa: BLE001  a family that fails is a row, the others go on
                row = dict(status="error", error=f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/"),
                           seconds=time.perf_counter() - start)
            finally:
                signal.alarm(0)
            row["commit"] = meta["commit"]
            results[model] = row
            print(f"{fam:<18} {model:<24} {row['status']:<17} "
                  f"binary PFR {row.get('binary_pfr', float('nan')):.3f} {row['seconds']:.0f}s "
                  f"{_fmt_refused(row) or row.get('error', '')[:100]}"
                  + (f" LCE: {_fmt_lce(row)}" if args.lce else ""), flush=True)
            with open(json_path, "w") as f:
                json.dump(dict(meta=meta, families=results), f, indent=1)
            write_markdown(md_path, results, meta)
    write_markdown(md_path, results, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
