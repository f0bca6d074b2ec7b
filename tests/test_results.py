"""results.py on hand-written results.json files: means and sample standard deviations by hand, delta_m
against the STL runs among the inputs (else the papers' row), the papers' figures, a group of mixed configs
flagged and kept apart, a missing metric shown as missing, runs of different commits flagged, --json, --plot."""
import json
import math
import os

import pytest
from PIL import Image

import results


def write_run(folder, model, seed, metrics, dataset='nyuv2', commit='a' * 40, dirty=False, **config):
    """A results.json as train.py writes it, with only what results.py reads."""
    os.makedirs(folder, exist_ok=True)
    tasks = list(metrics)
    cfg = dict({'dataset': dataset, 'model': model, 'backbone': 'hrnet18', 'seed': seed, 'tasks': tasks,
                'lr': 1e-4, 'epochs': 5, 'out_dir': str(folder)}, **config)
    record = {'model': model, 'dataset': dataset, 'backbone': 'hrnet18', 'seed': seed, 'params': 4_000_000 + seed,
              'final': {'metrics': metrics}, 'git': {'commit': commit, 'dirty': dirty}, 'config': cfg}
    with open(os.path.join(folder, 'results.json'), 'w') as f:
        json.dump(record, f)
    return str(folder)


def nyu(miou, rel, mean):
    return {'semseg': {'mIoU': miou, 'pixel_acc': 60.0}, 'depth': {'rel_err': rel, 'abs_err': 0.5},
            'normals': {'mean': mean, 'median': 20.0}}


def sample_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@pytest.fixture
def runs(tmp_path):
    """3 seeds of mtl, 2 of stl, one mtl run with another lr, one ctal_ss without normals."""
    paths = [write_run(tmp_path / f'mtl{s}', 'mtl', s, nyu(40 + s, 0.20 + 0.01 * s, 30 - s)) for s in range(3)]
    paths += [write_run(tmp_path / f'stl{s}', 'stl', s, nyu(44 + 2 * s, 0.18, 28.0)) for s in range(2)]
    paths.append(write_run(tmp_path / 'mtl_lr', 'mtl', 0, nyu(10, 0.5, 50), lr=1e-3))
    paths.append(write_run(tmp_path / 'ctal', 'ctal_ss', 0, {k: v for k, v in nyu(50, 0.16, 0).items()
                                                              if k != 'normals'}))
    return paths


def test_means_stds_and_delta_m_by_hand(runs):
    rows = results.table_rows(results.read_runs(runs)[0])
    mtl = next(r for r in rows if r['model'] == 'mtl' and r['n'] == 3)
    assert mtl['seeds'] == [0, 1, 2]
    assert mtl['metrics']['semseg']['value'] == pytest.approx({'mean': 41.0, 'std': 1.0, 'n': 3})
    assert mtl['metrics']['depth']['value']['std'] == pytest.approx(sample_std([0.20, 0.21, 0.22]))
    # the reference: the STL runs' mean (45, 0.18, 28); delta_m per run, then mean and std
    per_run = [100 / 3 * ((40 + s - 45) / 45 - (0.20 + 0.01 * s - 0.18) / 0.18 - (30 - s - 28) / 28) for s in range(3)]
    assert mtl['delta_m']['value']['mean'] == pytest.approx(sum(per_run) / 3)
    assert mtl['delta_m']['value']['std'] == pytest.approx(sample_std(per_run))
    assert mtl['reference'] == 'the 2 STL run(s) among these'
    # the papers' figures for NYUv2 / HRNet-18 (CTAL Tab. 1): MTL 49.25 / 0.1658 / 24.16, delta_m -1.89
    assert mtl['metrics']['semseg']['paper'] == 49.25 and mtl['delta_m']['paper'] == pytest.approx(-1.89, abs=0.01)
    stl = next(r for r in rows if r['model'] == 'stl')
    assert stl['delta_m']['value']['mean'] == pytest.approx(0.0, abs=1e-12)
    assert stl['metrics']['semseg']['value']['std'] == pytest.approx(math.sqrt(2))


def test_mixed_configs_are_flagged_not_averaged_and_missing_metrics_shown(runs, capsys):
    rows = results.table_rows(results.read_runs(runs)[0])
    mtl = [r for r in rows if r['model'] == 'mtl']
    assert sorted(r['n'] for r in mtl) == [1, 3]                       # two rows, not one of 4
    assert all(any('lr=' in f for f in r['flags']) for r in mtl)
    assert any("lr=0.001" in f for r in mtl if r['n'] == 1 for f in r['flags'])
    assert results.main(runs) == 0
    table = capsys.readouterr().out
    ctal = next(line for line in table.splitlines() if line.startswith('| ctal_ss'))
    cells = [c.strip() for c in ctal.strip('|').split('|')]
    head = next(line for line in table.splitlines() if line.startswith('| model'))
    names = [c.strip() for c in head.strip('|').split('|')]
    assert names == ['model', 'n', 'semseg mIoU ↑', 'depth rel_err ↓', 'normals mean ↓', 'Δm % ↑', 'params (M)']
    row = dict(zip(names, cells))
    assert row['normals mean ↓'] == '—' and row['semseg mIoU ↑'] == '50.00 [51.59]'
    # delta_m over the tasks the run has: semseg and depth against the STL runs
    assert row['Δm % ↑'].startswith(f"{100 / 2 * ((50 - 45) / 45 - (0.16 - 0.18) / 0.18):.2f} [")
    mtl3 = next(line for line in table.splitlines() if line.startswith('| mtl') and '| 3 |' in line)
    assert '41.00 ± 1.00 [49.25]' in mtl3


def test_different_commits_and_a_dirty_tree_are_flagged(tmp_path):
    paths = [write_run(tmp_path / 'a', 'mtl', 0, nyu(40, 0.2, 30), commit='1' * 40),
             write_run(tmp_path / 'b', 'mtl', 1, nyu(41, 0.2, 30), commit='2' * 40, dirty=True)]
    row, = results.table_rows(results.read_runs(paths)[0])
    assert row['flags'] == ["runs from 2 different commits: 1111111111, 2222222222+dirty"]
    row, = results.table_rows(results.read_runs(paths[1:])[0])
    assert row['flags'] == ["from a modified checkout (git dirty)"]


def test_papers_reference_without_stl_runs_and_json_output(tmp_path, capsys):
    paths = [write_run(tmp_path / f'm{s}', 'ctal_ss', s, nyu(50, 0.16, 23)) for s in range(2)]
    assert results.main(paths + ['--json']) == 0
    row, = json.loads(capsys.readouterr().out)
    ref = {'semseg': 49.23, 'depth': 0.1636, 'normals': 23.15}                  # CTAL Tab. 1's STL row
    hand = 100 / 3 * ((50 - ref['semseg']) / ref['semseg'] - (0.16 - ref['depth']) / ref['depth']
                      - (23 - ref['normals']) / ref['normals'])
    assert row['delta_m']['value'] == pytest.approx({'mean': hand, 'std': 0.0, 'n': 2})
    assert row['reference'].startswith("the papers' STL row (CTAL Tab. 1")


def test_unfinished_and_foreign_folders_are_skipped_with_a_note(tmp_path, capsys):
    (tmp_path / 'unfinished').mkdir()
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'results.json').write_text('{"not": "ours"}')
    assert results.main([str(tmp_path / 'unfinished'), str(tmp_path / 'other')]) == 1
    err = capsys.readouterr().err
    assert 'skipped' in err and 'unfinished: no results.json' in err and 'not a results.json of train.py' in err
    assert err.strip().endswith("error: no results.json among the paths given; pass run folders such as out/*/")


def test_plot_is_written(runs, tmp_path):
    """The figure: a row of panels per (dataset, backbone): delta_m and one per task, a bar per model row."""
    assert results.main(runs + ['--plot', str(tmp_path / 'r.png')]) == 0
    image = Image.open(tmp_path / 'r.png')
    assert image.format == 'PNG' and image.size == (int(3.2 * 4 * 120), int(3.0 * 120))
