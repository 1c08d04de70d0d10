"""The study's figures (matplotlib), from its results alone: a study JSON redraws them all.

table1.png and related.png: accuracy over tokens per step; curves.png: validation learning
curves; figure2.png: the calibration distance over training; figure3.png: accuracy over s/T;
plot_curves: the learning curves of any run with --curve_every; plot_parallelism: accuracy against
tokens per forward under threshold decoding (the curve AUP is read from)."""

import functools
import os

import numpy as np

RELATED = ["Base", "Base-Self", "COPSD", "SFT", "SFT + Base-Self", "SFT + COPSD", "SelFusion",
           "d-OPSD", "OPDLM"]


def pyplot():
    import matplotlib  # imported here: the rest of the notebook runs without it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure(path, panels, draw, xlabel, ylabel, log_ns=None):
    """One PNG, a panel per {title: data}: draw(ax, data), the axes' labels, a grid, the legend
    in the last panel (log_ns: a log2 x axis with these ticks)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels.items()):
        draw(ax, data)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if log_ns:
            ax.set_xscale("log", base=2)
            ax.set_xticks(log_ns, [str(n) for n in log_ns])
        ax.grid(alpha=0.3)
    labels = {}  # every panel's rows in one legend, in the last panel
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    axes[0][-1].legend(labels.values(), labels.keys(), fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy(runs, n):
    """Test blank cells correct (%) at column n: mean and std over the seeds' runs."""
    v = 100 * np.array([r["test"][n]["cell_acc"] for r in runs])
    return v.mean(), v.std()


def by_tokens(ax, table, rows, color):
    cols = [n for n in table["Base"][0]["test"] if "τ" not in n]
    for row in rows:
        m = np.array([accuracy(table[row], n) for n in cols])
        ax.errorbar([int(n) for n in cols], m[:, 0], yerr=m[:, 1], marker="o", ms=3, capsize=2,
                    label=row, color=color[row])


def learning_curves(ax, table, rows, color):
    """Validation accuracy over post-training steps (mean of the seeds; step 0: the base)."""
    for row in rows:
        runs = [r["curve"] for r in table[row]]
        steps = [p["step"] for p in runs[0]]
        for key, style in (("val1", "-"), ("val16", "--")):
            v = 100 * np.array([[p[key] for p in c] for c in runs]).mean(0)
            ax.plot([0] + steps, [100 * np.mean([b["val"][key[3:]]["cell_acc"]
                                                 for b in table["Base"]])] + list(v),
                    style, color=color[row], label=row if key == "val1" else None)


def distance(ax, table, rows, color):
    """Figure 2: the calibration distance d of each step (mean of the seeds, 5-step mean)."""
    for row in rows:
        d = np.array([[h["d"] for h in r["history"][0]] for r in table[row]]).mean(0)
        ax.plot(np.convolve(d, np.ones(5) / 5, mode="valid"), label=row, color=color[row])


def s_sweep(ax, table, s, sweep_s):
    """Figure 3: COPSD's accuracy over s/T at 1, 4 and 16 tokens/step; gray: the base's."""
    values = sorted([s] + list(sweep_s))
    for n, style in (("1", "o-"), ("4", "s-"), ("16", "^-")):
        rows = [table["COPSD" if v == s else f"COPSD s/T={v}"] for v in values]
        m = np.array([accuracy(r, n) for r in rows])
        ax.errorbar(values, m[:, 0], yerr=m[:, 1], fmt=style, capsize=2,
                    label=f"COPSD, {n} tokens/step")
        ax.axhline(accuracy(table["Base"], n)[0], ls=":", color="gray")


def plot(results, out_dir, s, sweep_s, main, other):
    """The five figures of a study's results ({regime: dict(lr, steps, table)}) into out_dir:
    a panel per regime; main: Table 1's self-distillation rows, other: the rest (a row keeps
    its color in every figure); s, sweep_s: Figure 3's values."""
    os.makedirs(out_dir, exist_ok=True)
    hues = [pyplot().cm.tab20(j) for j in [*range(0, 20, 2), *range(1, 20, 2)]]
    color = dict(zip(["Base", *main, *other], hues))
    def at_shared(r, res):
        return f"{r} (lr {res['lr']}, {res['steps']} steps)"
    # a study that chose per method: every row at its own choice, but Figure 3 (its s/T rows
    # ran at the shared choice) with COPSD at the shared one too
    panels = {f"{r} (each row at its own choice)" if "own" in res else at_shared(r, res):
              res["table"] for r, res in results.items()}
    shared = {at_shared(r, res): res["table"] | res.get("shared_table", {})
              for r, res in results.items()}
    ns = [int(n) for n in next(iter(results.values()))["table"]["Base"][0]["test"] if "τ" not in n]
    acc, tokens = "blank cells correct (%)", "tokens per step"
    for name, draw, ylabel, xlabel, log_ns in [
            ("table1.png", functools.partial(by_tokens, rows=["Base", *main], color=color), acc,
             tokens, ns),
            ("related.png", functools.partial(by_tokens, rows=RELATED, color=color), acc,
             tokens, ns),
            ("curves.png", functools.partial(learning_curves, color=color, rows=[
                *main, "SFT", "SelFusion", "d-OPSD"]), "validation blank cells (%)",
             "post-training step (solid: 1, dashed: 16 tokens/step)", None),
            ("figure2.png", functools.partial(distance, color=color, rows=[
                r for r in main if r.startswith("COPSD")]),
             "calibration distance d (5-step mean)", "post-training step", None),
            ("figure3.png", functools.partial(s_sweep, s=s, sweep_s=sweep_s), acc,
             "s/T (t/T = 0.9); gray: Base", None)]:
        figure(os.path.join(out_dir, name), shared if name == "figure3.png" else panels, draw,
               xlabel, ylabel, log_ns)


def curve_lines(ax, results):
    """Each trained row's validation accuracy (mean over seeds; solid 1, dashed 16 tokens/step)
    and, as horizontal lines, the rows that did not train (the base, OPDLM's AR teacher)."""
    for i, (row, runs) in enumerate(results.items()):
        for n, style in (("1", "-"), ("16", "--")):
            label = row if n == "1" else None
            if runs[0]["curve"]:
                steps = [p["step"] for p in runs[0]["curve"]]
                v = 100 * np.mean([[p[f"val{n}"] for p in r["curve"]] for r in runs], 0)
                ax.plot(steps, v, style, color=f"C{i}", label=label)
            elif "val" in runs[0]:
                ax.axhline(100 * np.mean([r["val"][n]["cell_acc"] for r in runs]),
                           ls=style, lw=1, color=f"C{i}", label=label)


def plot_curves(panels, path):
    """Learning curves of runs with --curve_every, one panel per {title: results}."""
    figure(path, panels, curve_lines, "post-training step (solid: 1, dashed: 16 tokens/step)",
           "validation blank cells (%)")


def parallelism(ax, results, order=()):
    """Each row's accuracy-parallelism curve: test blank cells correct (%) against tokens per
    forward, at 1 token/step and at each threshold (mean over seeds), left to right; a row's
    color is its place in `order` (every panel's rows), else in results."""
    order = list(order) or list(results)
    for row, runs in results.items():
        i = order.index(row)
        cols = [n for n in runs[0]["test"] if n == "1" or "τ" in n]
        x, y = (np.array([np.mean([scale * r["test"][n][key] for r in runs]) for n in cols])
                for key, scale in (("tpf", 1), ("cell_acc", 100)))
        ax.plot(x[np.argsort(x)], y[np.argsort(x)], "-o" if i < 10 else "--s", ms=3,
                color=f"C{i % 10}", label=row)


def plot_parallelism(panels, path):
    """The accuracy-parallelism curves, one panel per {title: results}."""
    order = dict.fromkeys(row for results in panels.values() for row in results)
    figure(path, panels, functools.partial(parallelism, order=order),
           "tokens per forward (threshold decoding)", "test blank cells (%)")
