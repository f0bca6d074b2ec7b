"""Put finished runs side by side, over seeds and against the papers.

    python results.py out/*/                       # one Markdown table per (dataset, backbone)
    python results.py out/*/ --plot results.png    # and a figure: delta_m and each task's metric per model
    python results.py out/*/ --json                # the same numbers as JSON, for machines

Reads each run's results.json (train.py writes it when a run ends; a folder without one is skipped with a
note) and groups the runs by (dataset, backbone, model). A group's row gives, per task, the metric the
papers tabulate (metrics.gain_metrics: mIoU, depth rel_err (NYUD: RMSE), normals mean angle, saliency
maxF, edge loss) of the final evaluation as mean ± sample standard deviation over its runs (n of them),
then delta_m (metrics.delta_m, per run, then mean ± std) against one STL reference per (dataset, backbone):
the STL runs among the inputs (the mean of their seeds) if there are any, else the papers' single-task
row (metrics.STL_REFERENCE). Beside each number, in brackets, the papers' figure where a paper prints one
for that model (metrics.PAPER_RESULTS; its delta_m computed the same way from the printed numbers). The
papers' figures hold for the papers' settings (configs/<dataset>_<model>.py with ImageNet weights).
Runs of one group whose configs differ other than by seed (and keys that do not change the result:
IGNORED_KEYS) are not averaged: each config is its own row, flagged with what differs; a group whose runs
come from different git commits, or from a modified checkout, is flagged too.
"""
import argparse
import json
import math
import os
import statistics
import sys

from metrics import PAPER_RESULTS, STL_REFERENCE, delta_m, gain_metrics

# config keys that do not change what a run computes (or only where it is written / how it is shown)
IGNORED_KEYS = ('seed', 'out_dir', 'data_root', 'resume', 'eval_only', 'device', 'num_workers', 'log_interval',
                'eval_log_interval', 'vis_images', 'stl_results', 'compile')
STL_MODELS = ('stl', 'atrc_stl')          # the single-task baselines: ours, ATRC's (NYUD)
SIGN = {+1: '↑', -1: '↓'}


# ------------------------------------------------------------------------------------------ reading

def read_runs(paths):
    """[results.json of each path (a run's folder or the file)], and a note for each path skipped."""
    runs, notes = [], []
    for path in paths:
        file = os.path.join(path, 'results.json') if os.path.isdir(path) else path
        if not os.path.isfile(file):
            notes.append(f"skipped {path}: no results.json (an unfinished run, or not a run folder)")
            continue
        try:
            with open(file) as f:
                run = json.load(f)
            ok = isinstance(run, dict) and isinstance(run.get('config'), dict) and 'metrics' in (run.get('final') or {})
        except (OSError, ValueError):
            ok = False
        if not ok:
            notes.append(f"skipped {file}: not a results.json of train.py (no config and final metrics in it)")
            continue
        run['path'] = file
        runs.append(run)
    return runs, notes


def config_key(run):
    return json.dumps({k: v for k, v in run['config'].items() if k not in IGNORED_KEYS}, sort_keys=True)


def differences(configs):
    """{key: [value per config]} of the keys on which the configs differ."""
    keys = sorted(set().union(*configs))
    return {k: [c.get(k) for c in configs] for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1}


# ------------------------------------------------------------------------------------------ numbers

def summary(values):
    """{'mean', 'std' (sample, None for one value), 'n'} of the values that are not None; None if none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else None,
            'n': len(values)}


def gain_value(run, task):
    """The run's final value of the task's gain metric, None where the run has no such result."""
    metric = gain_metrics(run['config']['dataset'])[task][0]
    return (run['final']['metrics'].get(task) or {}).get(metric)


def references(runs):
    """{(dataset, backbone): (reference {task: value}, where from)}: the STL runs among `runs` (mean over
    them), else the papers' STL row."""
    out = {}
    for dataset, backbone in {(r['dataset'], r['backbone']) for r in runs}:
        stl = [r for r in runs if (r['dataset'], r['backbone']) == (dataset, backbone) and r['model'] in STL_MODELS]
        if stl:
            tasks = sorted({t for r in stl for t in r['final']['metrics']})
            values = {t: summary([gain_value(r, t) for r in stl]) for t in tasks}
            mixed = ' (of different configs!)' if len({config_key(r) for r in stl}) > 1 else ''
            out[dataset, backbone] = ({t: v['mean'] for t, v in values.items() if v},
                                      f"the {len(stl)} STL run(s) among these{mixed}")
        elif (dataset, backbone) in STL_REFERENCE:
            out[dataset, backbone] = (STL_REFERENCE[dataset, backbone],
                                      f"the papers' STL row ({PAPER_RESULTS[dataset, backbone][0]})")
        else:
            out[dataset, backbone] = (None, "none: no STL run among these and no paper row")
    return out


def run_delta(run, reference):
    tasks = [t for t in run['final']['metrics'] if reference and t in reference]
    if not tasks:
        return None
    gain = gain_metrics(run['config']['dataset'])
    return delta_m({t: gain_value(run, t) for t in tasks}, {t: reference[t] for t in tasks}, gain)


def paper_row(dataset, backbone, model, tasks):
    """({task: the papers' figure}, the papers' delta_m over `tasks` against their STL row) or ({}, None)."""
    rows = PAPER_RESULTS.get((dataset, backbone), (None, {}))[1]
    if model not in rows:
        return {}, None
    shared = [t for t in tasks if t in rows[model] and t in STL_REFERENCE[dataset, backbone]]
    dm = delta_m({t: rows[model][t] for t in shared}, {t: STL_REFERENCE[dataset, backbone][t] for t in shared},
                 gain_metrics(dataset)) if shared else None
    return rows[model], dm


def table_rows(runs):
    """One row per (dataset, backbone, model, config), in input order: the numbers of the table."""
    refs, groups = references(runs), {}
    for run in runs:
        groups.setdefault((run['dataset'], run['backbone'], run['model']), {}).setdefault(config_key(run), []).append(run)
    rows = []
    for (dataset, backbone, model), by_config in groups.items():
        configs = [json.loads(k) for k in by_config]
        diff = differences(configs) if len(configs) > 1 else {}
        for i, members in enumerate(by_config.values()):
            rows.append(group_row(dataset, backbone, model, members, refs[dataset, backbone],
                                  {k: v[i] for k, v in diff.items()}))
    return rows


def group_row(dataset, backbone, model, members, reference, differs):
    tasks = list(dict.fromkeys(t for r in members for t in r['config']['tasks']))
    paper, paper_dm = paper_row(dataset, backbone, model, tasks)
    commits = {((r.get('git') or {}).get('commit'), (r.get('git') or {}).get('dirty')) for r in members}
    flags = [f"config differs from the group's other runs: {', '.join(f'{k}={v!r}' for k, v in differs.items())}"] \
        if differs else []
    if len(commits) > 1:
        flags.append(f"runs from {len(commits)} different commits: "
                     + ', '.join(sorted(f"{(c or 'unknown')[:10]}{'+dirty' * bool(d)}" for c, d in commits)))
    elif any(d for _, d in commits):
        flags.append("from a modified checkout (git dirty)")
    return {'dataset': dataset, 'backbone': backbone, 'model': model, 'n': len(members),
            'seeds': sorted(r['config']['seed'] for r in members), 'runs': [r['path'] for r in members],
            'metrics': {t: dict(metric=gain_metrics(dataset)[t][0], paper=paper.get(t),
                                value=summary([gain_value(r, t) for r in members])) for t in tasks},
            'delta_m': dict(paper=paper_dm, value=summary([run_delta(r, reference[0]) for r in members])),
            'params': summary([r.get('params') for r in members]), 'reference': reference[1], 'flags': flags}


# ------------------------------------------------------------------------------------------ output

def digits(x):
    """Decimals that show 4 significant digits of x (at least 2)."""
    return max(2, 3 - math.floor(math.log10(abs(x)))) if x else 2


def cell(value, paper=None, n_all=None, decimals=None):
    """'mean ± std [paper]' ('—' without a value; '(n=k)' where fewer runs than the group's have it), with
    `decimals` or 4 significant digits."""
    d = decimals or digits(paper if paper else value['mean'] if value else 0)
    if value is None:
        text = '—'
    else:
        mean = value['mean'] if abs(value['mean']) >= 0.5 * 10 ** -d else 0.0          # no '-0.00'
        text = f"{mean:.{d}f}" + (f" ± {value['std']:.{d}f}" if value['std'] is not None else '')
        text += f" (n={value['n']})" if n_all is not None and value['n'] < n_all else ''
    return text + (f" [{paper:.{d}f}]" if paper is not None else '')


def labels(part):
    """(each row's model name with the numbers of its notes, [the notes]) of one table."""
    names, notes = [], []
    for r in part:
        names.append(r['model'] + ''.join(f" ({len(notes) + i + 1})" for i in range(len(r['flags']))))
        notes += r['flags']
    return names, notes


def markdown(rows):
    """One Markdown table per (dataset, backbone), with its reference and flags as notes under it."""
    out = []
    for key in dict.fromkeys((r['dataset'], r['backbone']) for r in rows):
        part = [r for r in rows if (r['dataset'], r['backbone']) == key]
        tasks = list(dict.fromkeys(t for r in part for t in r['metrics']))
        gain = gain_metrics(key[0])
        head = ['model', 'n'] + [f"{t} {gain[t][0]} {SIGN[gain[t][1]]}" for t in tasks] + ['Δm % ↑', 'params (M)']
        out += [f"### {key[0]}, {key[1]}: Δm against {part[0]['reference']}", '',
                '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        names, notes = labels(part)
        for r, name in zip(part, names):
            params = f"{r['params']['mean'] / 1e6:.2f}" if r['params'] else '—'
            cells = [cell((r['metrics'].get(t) or {}).get('value'), (r['metrics'].get(t) or {}).get('paper'), r['n'])
                     if t in r['metrics'] else '—' for t in tasks]
            out.append('| ' + ' | '.join([name, str(r['n'])] + cells +
                                         [cell(r['delta_m']['value'], r['delta_m']['paper'], r['n'], 2), params]) + ' |')
        out += [''] + [f"({i + 1}) {note}" for i, note in enumerate(notes)] + [''] * bool(notes)
    out.append("mean ± sample std over the runs (n); [ ] the papers' figure where a paper prints one")
    return '\n'.join(out)


def plot(rows, path):
    """A row of panels per (dataset, backbone): delta_m, then each task's metric; a bar per table row (the
    mean, the std as error bar; labels as the table's) and the papers' figure as a black x."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = list(dict.fromkeys((r['dataset'], r['backbone']) for r in rows))
    panels = {k: ['delta_m'] + list(dict.fromkeys(t for r in rows if (r['dataset'], r['backbone']) == k
                                                  for t in r['metrics'])) for k in keys}
    width = max(map(len, panels.values()))
    fig, axes = plt.subplots(len(keys), width, figsize=(3.2 * width, 3.0 * len(keys)), squeeze=False)
    for ax_row, key in zip(axes, keys):
        part = [r for r in rows if (r['dataset'], r['backbone']) == key]
        names = labels(part)[0]
        for ax, name in zip(ax_row, panels[key]):
            entries = [r['delta_m'] if name == 'delta_m' else r['metrics'].get(name, {}) for r in part]
            mean = [e['value']['mean'] if e.get('value') else math.nan for e in entries]
            std = [(e['value']['std'] or 0) if e.get('value') else 0 for e in entries]
            ax.bar(range(len(part)), mean, yerr=std, capsize=3, color='tab:blue')
            for x, e in enumerate(entries):
                if e.get('paper') is not None:
                    ax.plot(x, e['paper'], 'kx', markersize=8)
            title = 'Δm % vs STL' if name == 'delta_m' else f"{name} {gain_metrics(key[0])[name][0]}"
            ax.set_title(f"{key[0]} {key[1]}: {title}", fontsize=8)
            ax.set_xticks(range(len(part)), names, rotation=45, ha='right', fontsize=7)
            ax.tick_params(axis='y', labelsize=7)
        for ax in ax_row[len(panels[key]):]:
            ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], usage=__doc__.split('\n\n')[1])
    parser.add_argument('paths', nargs='+', help="run folders (out/<run>/) or their results.json files")
    parser.add_argument('--plot', metavar='PNG', help="also draw the figure into this file")
    parser.add_argument('--json', action='store_true', help="print the rows as JSON instead of the tables")
    args = parser.parse_args(argv)
    runs, notes = read_runs(args.paths)
    for note in notes:
        print(note, file=sys.stderr)
    if not runs:
        print("error: no results.json among the paths given; pass run folders such as out/*/", file=sys.stderr)
        return 1
    rows = table_rows(runs)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows), flush=True)
    if args.plot:
        try:
            plot(rows, args.plot)
        except OSError as e:
            print(f"error: cannot write the figure {args.plot}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"figure: {args.plot}", file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
