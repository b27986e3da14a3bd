"""The benchmark's results.csv as a markdown table (results.md) and a plot (results.png)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from clipsel_jax.data.noise import NoiseSetting


def describe(noise: str) -> str:
    """'symmetric:0.2' -> '20% symmetric label noise' (and pair, corrupt, none)."""
    n = NoiseSetting.parse(noise)
    if n.kind == "none":
        return "no noise"
    what = "corrupted images" if n.kind == "corrupt" else f"{n.kind} label noise"
    return f"{n.fraction:.0%} {what}"


def _method_order(m: str):
    return (m in ("oracle", "full"), m == "full", m != "clipsel", m)


def _mean_sd(values) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.2%}" + (f" ± {np.std(values):.2%}" if len(values) > 1 else "")


def _floats(rs, field):
    return [float(r[field]) for r in rs if r[field] != ""]


def read_rows(results: Path) -> list[dict]:
    with open(results) as f:
        return list(csv.DictReader(f))


def write_table(results: Path, out: Path) -> None:
    rows = read_rows(results)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["noise"], float(r["ratio"]), r["method"], r["arch"]), []).append(r)
    noises = sorted({k[0] for k in groups}, key=lambda n: (NoiseSetting.parse(n).kind, NoiseSetting.parse(n).fraction))
    lines = ["| noise | keep | method | model | noisy in kept | detection AUC | class kept min-max | test acc (mean ± sd) "
             "| select s | train s | seeds |",
             "| --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for noise in noises:
        for (nz, ratio, method, arch), rs in sorted(((k, v) for k, v in groups.items() if k[0] == noise),
                                                   key=lambda kv: (kv[0][1], _method_order(kv[0][2]), kv[0][3])):
            auc = _floats(rs, "detect_auc")
            train_s = _floats(rs, "train_s")
            lines.append(
                f"| {describe(noise)} | {ratio:.0%} | {method} | {arch or '-'} | "
                f"{np.mean(_floats(rs, 'noisy_kept_frac')):.2%} | {f'{np.mean(auc):.3f}' if auc else '-'} | "
                f"{min(_floats(rs, 'class_frac_min')):.2f}-{max(_floats(rs, 'class_frac_max')):.2f} | "
                f"{_mean_sd(_floats(rs, 'test_accuracy'))} | {np.mean(_floats(rs, 'select_s')):.1f} | "
                f"{f'{np.mean(train_s):.0f}' if train_s else '-'} | {len(rs)} |")
    lines += ["", "Per noise setting and model: test accuracy, mean ± sd over seeds (the noisy share of the kept set; "
              "the ranking's detection AUC where the method ranks); the best accuracy of each column in bold "
              "(references excluded).", ""]
    for noise in noises:
        for arch in sorted({k[3] for k in groups if k[0] == noise}):
            cells = {(k[2], k[1]): v for k, v in groups.items() if k[0] == noise and k[3] == arch}
            ratios = sorted({r for _, r in cells})
            methods = sorted({m for m, _ in cells}, key=_method_order)
            best = {}
            for ratio in ratios:
                accs = [np.mean(_floats(v, "test_accuracy")) for (m, r), v in cells.items()
                        if r == ratio and m not in ("oracle", "full") and _floats(v, "test_accuracy")]
                best[ratio] = max(accs) if accs else None
            what = arch or "selection only: the noisy share of the kept set, mean ± sd over seeds"
            lines += [f"**{describe(noise)}, {what}**", "",
                      "| method | " + " | ".join(f"keep {r:.0%}" for r in ratios) + " |",
                      "| --- |" + " ---: |" * len(ratios)]
            for m in methods:
                out_row = []
                for r in ratios:
                    if (m, r) not in cells:
                        out_row.append("-")
                        continue
                    rs = cells[(m, r)]
                    acc = _floats(rs, "test_accuracy")
                    auc = _floats(rs, "detect_auc")
                    seeds = f"{len(rs)} seed{'s' if len(rs) > 1 else ''}"
                    if not arch:  # selection-only rows: the noisy share over the seeds is the measurement
                        out_row.append(f"{_mean_sd(_floats(rs, 'noisy_kept_frac'))} ("
                                       + (f"AUC {np.mean(auc):.3f}; " if auc else "") + f"{seeds})")
                        continue
                    a = _mean_sd(acc)
                    if acc and best[r] is not None and np.mean(acc) == best[r] and m not in ("oracle", "full"):
                        a = f"**{a}**"
                    extra = f"{np.mean(_floats(rs, 'noisy_kept_frac')):.2%}" + (f"; AUC {np.mean(auc):.3f}" if auc
                                                                               else "")
                    out_row.append(f"{a} ({extra}; {seeds})")
                lines.append(f"| {m} | " + " | ".join(out_row) + " |")
            lines.append("")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text(), file=sys.stderr)


def write_plot(results: Path, out: Path) -> None:
    """Per noise setting (columns): test accuracy vs keep ratio for each trained model, and the noisy share of each
    kept set (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(results)
    noises = sorted({r["noise"] for r in rows})
    archs = sorted({r["arch"] for r in rows if r["test_accuracy"]})
    panels = [("test_accuracy", a, f"test accuracy ({a})") for a in archs]
    panels.append(("noisy_kept_frac", None, "noisy share of the kept set"))
    fig, axes = plt.subplots(len(panels), len(noises), figsize=(5.5 * len(noises), 4 * len(panels)), squeeze=False)
    methods = sorted({r["method"] for r in rows}, key=_method_order)
    for j, noise in enumerate(noises):
        for i, (field, arch, label) in enumerate(panels):
            ax = axes[i][j]
            if field == "noisy_kept_frac" and NoiseSetting.parse(noise).kind == "none":
                ax.text(0.5, 0.5, "no noise", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for m in methods:
                pts: dict = {}
                for r in rows:
                    if r["method"] == m and r["noise"] == noise and r[field] and (arch is None or r["arch"] == arch):
                        pts.setdefault(float(r["ratio"]), []).append(float(r[field]))
                if pts and m == "full":  # a reference level, not a curve over ratios
                    ax.axhline(np.mean(pts[1.0]), color="k", ls="--", lw=1, label="full set")
                elif pts:
                    xs = sorted(pts)
                    ax.errorbar(xs, [np.mean(pts[x]) for x in xs], yerr=[np.std(pts[x]) for x in xs], marker="o",
                                capsize=3, label=m, lw=2.5 if m == "clipsel" else 1,
                                ls=":" if m == "oracle" else "-", color="k" if m == "oracle" else None)
            ax.set_title(describe(noise))
            ax.set_xlabel("keep ratio")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
