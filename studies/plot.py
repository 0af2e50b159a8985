"""A study's figure: per-seed accuracies, paired differences, the broad_scale sweep and the mean
test curves, from per-run results (the mappings of ``studies.report``)."""
from __future__ import annotations

import math
import os
import statistics
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from studies.report import default_pairs, mean_std, paired_differences, short_pair, summarize


def _wrap_label(text: str, width: int = 15) -> str:
    """Tick label on several lines: one per comma-separated part, long names cut after an '_'."""
    out = []
    for part in text.replace(': ', ':, ').replace(' − ', ', − ').split(', '):
        while len(part) > width and '_' in part[4:width + 1]:
            cut = part.rfind('_', 4, width + 1) + 1
            out.append(part[:cut])
            part = part[cut:]
        out.append(part)
    return '\n'.join(out)


def make_plot(results: Sequence[Mapping[str, Any]], out_path: str, title: str) -> None:
    """Up to four panels: per-seed final top-1 of every variant (bvit and wrapped groups), the
    per-seed paired difference broad − twin, the broad_scale sweep, and the mean test-accuracy
    curves of the bvit and wrapped groups."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    compare = summarize([r for r in results if r['group'] in ('bvit', 'wrapped')])
    pairs = [p for p in default_pairs(results) if paired_differences(results, *p)['seeds']]
    sweep = [r for r in results if r['group'] == 'scale']
    curves = [r for r in results if r['group'] in ('bvit', 'wrapped') and r.get('curve')]
    panels = [p for p, ok in (('compare', compare), ('pairs', pairs), ('sweep', sweep), ('curves', curves)) if ok]
    if not panels:
        raise ValueError('no results to plot')
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.2 * ncols, 4.4 * nrows), squeeze=False)
    axes = list(axes.ravel())
    for ax in axes[len(panels):]:
        ax.axis('off')

    def color_of(meta: Mapping[str, Any]) -> str:
        return 'tab:blue' if meta.get('broad') else 'tab:gray'

    for ax, panel in zip(axes, panels):
        if panel == 'compare':
            for i, row in enumerate(compare):
                n = len(row['acc1'])
                xs = [i - 0.15 + 0.2 * j / max(n - 1, 1) for j in range(n)]
                ax.scatter(xs, row['acc1'], s=14, color=color_of(row['meta']), alpha=0.6, zorder=2)
                m, sd = mean_std(row['acc1'])
                ax.errorbar([i + 0.22], [m], yerr=[sd], fmt='o', color=color_of(row['meta']), capsize=4, ms=6, zorder=3)
                ax.annotate(f'{m:.1f}', (i + 0.3, m), fontsize=7, va='center')
            ax.set_xticks(range(len(compare)))
            ax.set_xticklabels([_wrap_label(r['label']) for r in compare], fontsize=7)
            ax.set_xlim(-0.5, len(compare) - 0.3)
            ax.set_ylabel('final-epoch top-1 (%)')
            ax.set_title('final top-1: each seed (dots), mean ± std; blue = broad attention', fontsize=9)
            ax.grid(axis='y', alpha=0.3)
        elif panel == 'pairs':
            for i, (a, b) in enumerate(pairs):
                d = paired_differences(results, a, b)
                n = len(d['diffs'])
                xs = [i - 0.15 + 0.2 * j / max(n - 1, 1) for j in range(n)]
                ax.scatter(xs, d['diffs'], s=16, color='tab:blue', alpha=0.6, zorder=2)
                m, sd = mean_std(d['diffs'])
                ax.errorbar([i + 0.22], [m], yerr=[sd], fmt='o', color='tab:blue', capsize=4, ms=6, zorder=3)
                ax.annotate(f'{m:+.2f}', (i + 0.3, m), fontsize=7, va='center')
            ax.axhline(0, color='black', lw=0.8)
            ax.set_xticks(range(len(pairs)))
            ax.set_xticklabels([_wrap_label(short_pair(a, b), 22) for a, b in pairs], fontsize=7)
            ax.set_xlim(-0.5, len(pairs) - 0.3)
            ax.set_ylabel('top-1 difference (points), same seed')
            ax.set_title('broad − twin, per seed (dots), mean ± std', fontsize=9)
            ax.grid(axis='y', alpha=0.3)
        elif panel == 'sweep':
            by: Dict[float, List[float]] = {}
            for r in sweep:
                by.setdefault(float(r['meta'].get('broad_scale', math.nan)), []).append(float(r['acc1']))
            xs = sorted(by)
            for x in xs:
                ax.scatter([x] * len(by[x]), by[x], s=14, color='tab:blue', alpha=0.5)
            ms = [mean_std(by[x]) for x in xs]
            ax.errorbar(xs, [m for m, _ in ms], yerr=[sd for _, sd in ms], color='tab:blue', capsize=4, marker='o')
            ax.set_xticks(xs)
            ax.set_xlabel('broad_scale (0: the no-broad twin; 0.4: as released)')
            ax.set_ylabel('final-epoch top-1 (%)')
            stems = sorted({str(r['meta'].get('stem')) for r in sweep})
            stem_txt = ', '.join('conv stem' if x == 'conv' else 'no stem' for x in stems)
            ax.set_title(f'broad_scale sweep, {stem_txt}: each seed (dots), mean ± std', fontsize=9)
            ax.grid(alpha=0.3)
        else:
            labels: List[str] = []
            for r in curves:
                if r['label'] not in labels:
                    labels.append(r['label'])
            dashes = ['-', '--', ':', '-.']
            families: List[Tuple[Any, Any]] = []
            for lab in labels:
                meta = next(r['meta'] for r in curves if r['label'] == lab)
                fam = (meta.get('arch'), meta.get('stem'))
                if fam not in families:
                    families.append(fam)
                runs = [r for r in curves if r['label'] == lab]
                cs = [r['curve'] for r in runs]
                n = min(len(c) for c in cs)
                xs = [e + 1 for e in (runs[0].get('curve_epochs') or range(n))[:n]]
                mean = [statistics.mean(c[e] for c in cs) for e in range(n)]
                ax.plot(xs, mean, label=f'{lab} ({len(cs)} seeds)', color=color_of(meta),
                        ls=dashes[families.index(fam) % len(dashes)])
            ax.set_xlabel('epoch')
            ax.set_ylabel('test top-1 (%), mean over seeds')
            ax.set_title('learning curves (blue = broad attention)', fontsize=9)
            ax.legend(fontsize=6.5, loc='lower right')
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
