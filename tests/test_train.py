"""train.py: config parsing and rejection, the recipe of every config, loss with deep supervision,
schedulers, training reduces the loss, exact resume after Ctrl-C, NaN stop, atomic checkpoints, clean
errors for missing data / weights, outputs, and a 2-process torchrun (gloo) run whose first-step
gradients equal the 1-process run on the same global batch.

Everything runs on CPU on tiny synthetic / NYUv2-format fixtures written into tmp folders."""
import glob
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import model
import train
from config import Config
from conftest import write_pascal_sample
from data import DATASETS
from metrics import STL_REFERENCE, TASK_METRIC, build_meters, delta_m

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (32, 64)     # smallest input the backbones take (multiples of 32)


def tiny_args(root, out, *extra):
    return [f'--data_root={root}', f'--out_dir={out}', '--n_train=8', '--n_val=4',
            f'--synthetic_size={SIZE}', '--batch_size=2', '--vis_images=2', '--log_interval=1',
            '--lr=1e-3', '--ctal_impl=linear', *extra]


def read_log(out_dir, kind='train'):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['type'] == kind]


# ---------------------------------------------------------------------------------------------- config

def test_overrides_are_parsed_against_the_defaults_types(tmp_path):
    config = tmp_path / 'c.py'
    config.write_text("model = 'mtl'\nepochs = 7\nlr = 3e-4\n")
    cfg = train.parse_config([str(config), '--epochs=9', '--bf16=False', '--augment=0', '--sync_bn=true',
                              '--scale=1/6', '--stl_results=out/stl/results.json', '--tasks=depth,semseg',
                              '--loss_weights={"semseg": 2, "depth": 0.5}', '--synthetic_size=64x96'])
    assert cfg['model'] == 'mtl' and cfg['lr'] == 3e-4            # from the file
    assert cfg['epochs'] == 9                                      # override applied after the file
    assert cfg['bf16'] is False and cfg['augment'] is False and cfg['sync_bn'] is True   # "False" is False
    assert cfg['scale'] == pytest.approx(1 / 6)
    assert cfg['stl_results'] == 'out/stl/results.json'            # None default: not a literal -> string
    assert cfg['tasks'] == ['semseg', 'depth']                     # canonical order
    assert cfg['loss_weights'] == {'semseg': 2.0, 'depth': 0.5}
    assert cfg['synthetic_size'] == [64, 96]
    assert cfg['data_root'] == os.path.join('data', 'synthetic')
    assert cfg['out_dir'] == os.path.join('out', 'synthetic_mtl')
    default = train.parse_config([])
    assert default['loss_weights'] == {'semseg': 1.0, 'depth': 1.0, 'normals': 1.0}
    assert default['tasks'] == list(DATASETS['synthetic']['tasks'])
    assert train.parse_config(['--pretrained=None'])['pretrained'] is None


@pytest.mark.parametrize('args, message', [
    (['--lrr=1'], "unknown key 'lrr'"),
    (['--bf16=maybe'], 'expected a boolean'),
    (['--epochs=ten'], 'expected an integer'),
    (['--epochs=-1'], 'epochs=-1: must be >= 1'),
    (['--lr=0'], 'lr=0.0: must be > 0'),
    (['--model=ctl'], "argument --model: invalid choice: 'ctl' (choose from 'stl', 'mtl'"),
    (['--dataset=kitti'], "argument --dataset: invalid choice: 'kitti'"),
    (['--scheduler=step'], "invalid choice: 'step' (choose from 'cosine', 'cosine_restarts', 'none', 'poly')"),
    (['--optimizer=lamb'], "argument --optimizer: invalid choice: 'lamb' (choose from 'adam', 'sgd')"),
    (['--iters=-3'], 'iters=-3: must be >= 0'),
    (['--ctal_impl=fast'], "argument --ctal_impl: invalid choice: 'fast'"),
    (['--device=tpu'], "device='tpu'"),
    (['--tasks=semseg,edge'], "tasks='semseg,edge'"),
    (['--loss_weights={"semseg": 1}'], 'loss_weights='),
    (['--batch_size=0'], 'batch_size=0: must be >= 1'),
    (['--epochs'], 'argument --epochs: expected one argument'),
    (['configs/nope.py'], "config file 'configs/nope.py' not found"),
])
def test_bad_keys_and_values_are_rejected_with_clear_messages(args, message, capsys):
    with pytest.raises(train.UserError, match=None) as e:
        train.parse_config(args)
    assert message in str(e.value)
    assert train.main(args) == 1                        # the command line prints it, no traceback
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_unknown_key_lists_the_valid_keys_also_from_a_config_file(tmp_path):
    config = tmp_path / 'c.py'
    config.write_text("epoch = 3\n")
    with pytest.raises(train.UserError) as e:
        train.parse_config([str(config)])
    assert "unknown key 'epoch'" in str(e.value) and str(config) in str(e.value)
    assert all(k in str(e.value) for k in train.DEFAULTS)
    config.write_text("epochs = '3'\n")                # a config file's value must have the default's type
    with pytest.raises(train.UserError, match="epochs='3': expected an integer"):
        train.parse_config([str(config)])


def test_every_config_follows_the_recipe():
    """Every (dataset, model) of the papers, with the authors' lr / wd / epochs / schedule / clip; PASCAL with
    their transformer code's per-model loss weights and L1 normals loss (no clipping: no code of theirs reads
    the clip value their configs name); nyud (ATRC's NYUD-v2) with ATRC's recipe and loss weights."""
    cnn_models = [m for m in train.MODEL_NAMES if m not in ('atrc_stl', 'atrc_mtl')]    # ATRC's baselines: nyud
    expected = {f'nyuv2_{m}' for m in cnn_models} | {f'cityscapes_{m}' for m in cnn_models} | \
        {f'pascal_{m}' for m in ('stl', 'mtl', 'padnet', 'papnet', 'ctal_ss', 'tif', 'atrc')} | \
        {f'nyud_{m}' for m in ('stl', 'mtl', 'atrc', 'atrc_ms', 'atrc_search', 'tif', 'ctal_ss')} | \
        {'synthetic_stl', 'synthetic_mtl', 'synthetic_ctal_ss', 'synthetic_tif', 'synthetic_atrc'}
    found = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))}
    assert expected <= found
    found -= {'recipe_atrc', 'recipe_tif'}                            # recipes to layer over these (tested below)
    recipe = {'nyuv2': (1e-4, 1e-4, 200, 0.0, 'hrnet18'), 'cityscapes': (5e-4, 1e-4, 75, 0.0, 'hrnet18'),
              'pascal': (2e-5, 1e-5, 70, 0.0, 'swinv2_s'), 'nyud': (0.01, 5e-4, 200, 0.0, 'hrnet18')}
    for name in sorted(found):
        cfg = train.parse_config([os.path.join(ROOT, 'configs', name + '.py')])
        dataset, model = name.split('_', 1)
        search = model.endswith('_search')                           # ATRC's architecture search
        model = model.removesuffix('_search')
        model = {'stl': 'atrc_stl', 'mtl': 'atrc_mtl'}.get(model, model) if dataset == 'nyud' else model
        assert (cfg['dataset'], cfg['model'], cfg['search']) == (dataset, model, search), name
        if dataset == 'synthetic':
            continue
        lr, wd, epochs, clip, backbone = recipe[dataset]
        clip = 10.0 if search else clip                               # the authors' search configs clip
        backbone = 'hrnet18' if model == 'atrc' else backbone         # ATRC's PASCAL-Context backbone (its Tab. 4)
        assert (cfg['lr'], cfg['weight_decay'], cfg['epochs'], cfg['grad_clip'], cfg['backbone']) == \
            (lr, wd, epochs, clip, backbone), name
        assert cfg['batch_size'] == 8 and cfg['gamma'] == 0.05 and cfg['pretrained'] is None, name
        assert cfg['normals_loss'] == ('l1' if dataset in ('pascal', 'nyud') else 'cosine'), name
        if dataset == 'nyud':                            # ATRC's recipe: SGD, poly per step, 40k steps (TIF: 50k)
            assert (cfg['optimizer'], cfg['scheduler'], cfg['iters'], cfg['eval_interval']) == \
                ('sgd', 'poly', 50000 if model == 'tif' else 40000, 10), name
            assert cfg['loss_weights'] == {'semseg': 1.0, 'depth': 1.0, 'normals': 10.0, 'edge': 50.0}, name
            continue
        ms = dataset == 'cityscapes' and model in ('mtinet', 'ctal_ms', 'atrc_ms')
        assert cfg['scheduler'] == ('cosine_restarts' if ms else 'cosine'), name
        assert cfg['restart_period'] is None and cfg['restart_mult'] == 2, name
        assert (cfg['optimizer'], cfg['iters']) == ('adam', 0), name               # ATRC's: configs/recipe_atrc.py
        if model == 'stl':                               # their STL: each network on its own unweighted loss
            assert set(cfg['loss_weights'].values()) == {1.0}, name
        elif dataset == 'pascal':
            assert cfg['loss_weights'] == {'semseg': 2.0 if model == 'ctal_ss' else 1.0, 'human_parts': 2.0,
                                           'saliency': 5.0, 'edge': 50.0, 'normals': 10.0}, name
        elif dataset == 'cityscapes':
            assert cfg['loss_weights'] == {'semseg': 1.0, 'depth': 10.0}, name


def test_schedulers_match_the_formulas():
    """Per-epoch cosine: lr_e = lr (1 + cos(pi e / E)) / 2. Warm restarts with T_0 = E // 3 = 25 and
    T_mult = 2: periods [0, 25) and [25, 75), lr back to the base at epoch 25."""
    def lrs(**kw):
        cfg = train.parse_config([f'--{k}={v}' for k, v in kw.items()])
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg['lr'])
        sched = train.make_scheduler(opt, cfg, cfg['epochs'], None)
        out = []
        for _ in range(cfg['epochs']):
            out.append(opt.param_groups[0]['lr'])
            opt.step()
            sched.step()
        return out

    cos = lrs(epochs=10, lr=0.1)
    assert cos == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(10)])
    warm = lrs(epochs=75, lr=0.5, scheduler='cosine_restarts')
    hand = [0.5 * (1 + math.cos(math.pi * e / 25)) / 2 for e in range(25)] + \
           [0.5 * (1 + math.cos(math.pi * (e - 25) / 50)) / 2 for e in range(25, 75)]
    assert warm == pytest.approx(hand)
    assert lrs(epochs=4, lr=0.2, scheduler='none') == pytest.approx([0.2] * 4)
    # ATRC's PolynomialLR over 40 iterations: lr_t = lr (1 - t / 40) ** 0.9, stepped after every optimiser step
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = train.make_scheduler(opt, train.parse_config(['--scheduler=poly']), None, 40)
    poly = []
    for _ in range(40):
        poly.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert poly == pytest.approx([0.01 * (1 - t / 40) ** 0.9 for t in range(40)], rel=1e-12, abs=1e-15)
    assert opt.param_groups[0]['lr'] == 0


def test_atrc_recipe_trains_by_iterations_with_sgd_and_poly(synthetic_root, tmp_path):
    """configs/recipe_atrc.py over a model config is ATRC's recipe; a run of `iters` steps stops mid-epoch
    (5 steps of 2 per epoch: 3 epochs, the last one step), steps the poly LR after every step and evaluates
    its last epoch; SGD with momentum 0.9 and the config's weight decay."""
    recipe = train.parse_config([os.path.join(ROOT, 'configs', 'nyuv2_atrc.py'), os.path.join(ROOT, 'configs', 'recipe_atrc.py')])
    assert (recipe['model'], recipe['optimizer'], recipe['lr'], recipe['weight_decay'], recipe['scheduler'],
            recipe['iters'], recipe['batch_size']) == ('atrc', 'sgd', 0.01, 5e-4, 'poly', 40000, 8)
    tif = train.parse_config([os.path.join(ROOT, 'configs', 'nyuv2_tif.py'), os.path.join(ROOT, 'configs', 'recipe_tif.py')])
    assert (tif['optimizer'], tif['lr'], tif['scheduler'], tif['iters']) == ('sgd', 0.01, 'poly', 50000)
    out = tmp_path / 'run'
    assert train.main(tiny_args(synthetic_root, out, '--model=mtl', '--max_steps_per_epoch=2', '--optimizer=sgd', '--lr=0.01',
                                '--weight_decay=5e-4', '--scheduler=poly', '--iters=5', '--vis_images=0')) == 0
    steps = read_log(out)
    assert [(r['epoch'], r['iter'], r['step']) for r in steps] == [(0, 1, 1), (0, 2, 2), (1, 1, 3), (1, 2, 4), (2, 1, 5)]
    assert [r['lr'] for r in steps] == pytest.approx([0.01 * (1 - t / 5) ** 0.9 for t in range(1, 6)], abs=1e-15)
    assert [e['epoch'] for e in read_log(out, 'eval')] == [1, 2, 3]
    with open(out / 'results.json') as f:
        res = json.load(f)
    assert (res['epochs'], res['steps']) == (3, 5)
    group = torch.load(out / 'ckpt.pt', weights_only=False)['optimizer']['param_groups'][0]
    assert (group['momentum'], group['weight_decay'], group['nesterov']) == (0.9, 5e-4, False)
    assert set(group) >= {'dampening'} and 'betas' not in group                       # torch.optim.SGD


def test_real_data_from_random_weights_warns_once(synthetic_root, tmp_path, capsys):
    """The synthetic files in the NYUv2 format read as nyuv2: a real dataset, so starting from random weights
    prints one warning line saying what the papers did and how to pass weights; synthetic runs do not."""
    args = tiny_args(synthetic_root, tmp_path / 'a', '--model=mtl', '--max_steps_per_epoch=1', '--epochs=1', '--vis_images=0')
    assert train.main(args + ['--dataset=nyuv2']) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('warning:')]
    assert len(lines) == 1 and 'random weights' in lines[0] and 'ImageNet' in lines[0] and '--pretrained=' in lines[0]
    assert train.main(tiny_args(synthetic_root, tmp_path / 'b', '--model=mtl', '--max_steps_per_epoch=1', '--epochs=1',
                                '--vis_images=0')) == 0
    assert 'warning:' not in capsys.readouterr().out


def test_loss_is_initial_plus_final_with_multiscale_mean():
    torch.manual_seed(0)
    B, H, W = 2, 8, 8
    batch = {'semseg': torch.randint(0, 13, (B, H, W)), 'depth': torch.rand(B, 1, H, W) + 0.1}
    pred = {'semseg': torch.randn(B, 13, H, W), 'depth': torch.randn(B, 1, H, W)}
    scales = {t: [torch.randn_like(p) for _ in range(4)] for t, p in pred.items()}
    single = {t: torch.randn_like(p) for t, p in pred.items()}
    tasks = ['semseg', 'depth']
    ce = lambda p, t: torch.nn.functional.cross_entropy(p, t)                 # noqa: E731 (no ignore here)
    l1 = lambda p, t: (p - t).abs().mean()                                    # noqa: E731 (all valid)
    ref = {'semseg': ce, 'depth': l1}
    none = train.compute_losses(dict(pred, initial={}), batch, tasks)         # stl / mtl
    ss = train.compute_losses(dict(pred, initial=single), batch, tasks)       # single-scale distillation
    ms = train.compute_losses(dict(pred, initial=scales), batch, tasks)       # mtinet / ctal_ms
    for t in tasks:
        final = ref[t](pred[t], batch[t])
        assert none[t].item() == pytest.approx(final.item(), rel=1e-5)
        assert ss[t].item() == pytest.approx((final + ref[t](single[t], batch[t])).item(), rel=1e-5)
        mean_scales = sum(ref[t](p, batch[t]) for p in scales[t]) / 4
        assert ms[t].item() == pytest.approx((final + mean_scales).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- training

def overfit_losses(synthetic_root, out, model, *extra, steps=6):
    """`steps` Adam steps on the whole 8-image training set (one batch = one epoch); the step losses."""
    assert train.main(tiny_args(synthetic_root, out, f'--model={model}', '--batch_size=8', f'--epochs={steps}',
                                '--scheduler=none', '--augment=False', f'--eval_interval={steps}',
                                '--vis_images=0', *extra)) == 0
    return [r['loss'] for r in read_log(out)]


def test_ctal_ss_training_reduces_the_loss_and_writes_its_outputs(synthetic_root, tmp_path):
    """A few epochs of ctal_ss: the loss goes down; config / log / results / PNG / checkpoint are written,
    and delta_m is computed against an STL results file."""
    stl = {'config': {'dataset': 'synthetic'},
           'final': {'metrics': {'semseg': {'mIoU': 5.0}, 'depth': {'rel_err': 0.5}, 'normals': {'mean': 40.0}}}}
    (tmp_path / 'stl.json').write_text(json.dumps(stl))
    out = str(tmp_path / 'run')
    assert train.main(tiny_args(synthetic_root, out, '--epochs=4', '--max_steps_per_epoch=2', '--batch_size=4',
                                '--eval_interval=2', f'--stl_results={tmp_path / "stl.json"}')) == 0
    losses = [r['loss'] for r in read_log(out)]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]
    for r in read_log(out):
        assert set(r['losses']) == {'semseg', 'depth', 'normals'} and r['img_per_s'] > 0 and r['eta_s'] >= 0
    evals = read_log(out, 'eval')
    assert [e['epoch'] for e in evals] == [2, 4]
    with open(os.path.join(out, 'config.json')) as f:
        assert json.load(f) == train.parse_config(tiny_args(synthetic_root, out, '--epochs=4', '--max_steps_per_epoch=2',
                                                            '--batch_size=4', '--eval_interval=2',
                                                            f'--stl_results={tmp_path / "stl.json"}'))
    with open(os.path.join(out, 'results.json')) as f:
        res = json.load(f)
    final = res['final']['metrics']
    ref = {'semseg': 5.0, 'depth': 0.5, 'normals': 40.0}
    assert res['final']['delta_m'] == pytest.approx(
        delta_m({t: final[t][TASK_METRIC[t][0]] for t in ref}, ref))
    assert res['final']['epoch'] == 4 and res['seed'] == 0 and res['versions']['torch'] == torch.__version__
    assert res['best']['epoch'] in (2, 4)
    head = subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'], capture_output=True, text=True)
    assert res['git']['commit'] == (head.stdout.strip() if head.returncode == 0 else None)
    assert res['git']['dirty'] in ((True, False) if head.returncode == 0 else (None,))
    assert res['command'].startswith('python train.py --data_root=') and f'--out_dir={out}' in res['command']
    assert res['cwd'] == os.getcwd()
    # the initial predictions' metrics beside the final ones, from the same meters
    assert set(res['final']['initial_metrics']) == {'semseg', 'depth', 'normals'}
    assert set(res['final']['initial_metrics']['normals']) == set(final['normals'])
    assert res['final']['initial_metrics']['depth'] != final['depth']
    png = Image.open(os.path.join(out, 'vis_epoch004.png'))
    tile_w = round(SIZE[1] * 128 / SIZE[0])                               # panels 128 px high
    assert png.size == (7 * tile_w, 16 + 2 * 128)           # input + 3 x (GT, pred); 2 rows under a header
    curves = Image.open(os.path.join(out, 'curves.png'))
    assert curves.size == (4 * 320, 280)                    # training losses + one panel per task
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ckpt['progress']['epoch'] == 4 and set(ckpt['rng']) >= {'torch', 'numpy', 'python'}
    assert not os.path.exists(os.path.join(out, 'ckpt.pt.tmp'))


@pytest.mark.parametrize('model', train.MODEL_NAMES)
def test_each_model_reduces_the_loss(model, synthetic_root, tmp_path):
    losses = overfit_losses(synthetic_root, str(tmp_path / model), model)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize('model', ('mtl', 'ctal_ss', 'tif'))
def test_transformer_backbone_reduces_the_loss(model, synthetic_root, tmp_path):
    """Swin-V2-S (random init) on the same tiny set: CTAL at the 1/32 grid (1 x 2 here)."""
    losses = overfit_losses(synthetic_root, str(tmp_path / model), model, '--backbone=swinv2_s', '--lr=5e-4',
                            steps=12)
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_after_ctrl_c_repeats_the_uninterrupted_losses_exactly(synthetic_root, tmp_path, monkeypatch):
    args = ['--model=ctal_ss', '--epochs=2', '--max_steps_per_epoch=3', '--eval_interval=1', '--vis_images=0']
    whole = str(tmp_path / 'whole')
    assert train.main(tiny_args(synthetic_root, whole, *args)) == 0

    calls = {'n': 0}
    compute = train.compute_losses

    def ctrl_c_in_step_4(*a):             # 0-based global step 4 = epoch 2, step 1: mid-epoch
        calls['n'] += 1
        if calls['n'] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return compute(*a)

    parts = str(tmp_path / 'parts')
    monkeypatch.setattr(train, 'compute_losses', ctrl_c_in_step_4)
    assert train.main(tiny_args(synthetic_root, parts, *args)) == 130
    ckpt = torch.load(os.path.join(parts, 'ckpt.pt'), weights_only=False)
    assert (ckpt['progress']['epoch'], ckpt['progress']['batches_done']) == (1, 2)   # step 4 completes, then it stops
    monkeypatch.setattr(train, 'compute_losses', compute)
    assert train.main(tiny_args(synthetic_root, parts, *args, '--resume=True')) == 0

    key = lambda r: (r['step'], r['loss'], r['losses'])                      # noqa: E731
    assert [key(r) for r in read_log(parts)] == [key(r) for r in read_log(whole)]   # exact equality
    metrics = lambda out: json.dumps([e['metrics'] for e in read_log(out, 'eval')])   # noqa: E731 (NaN == NaN)
    assert metrics(parts) == metrics(whole)
    # the same run cannot be started twice into one out_dir by accident
    assert train.main(tiny_args(synthetic_root, parts, *args)) == 1


def test_nan_loss_stops_naming_the_task_and_keeps_the_last_good_checkpoint(synthetic_root, tmp_path,
                                                                          monkeypatch, capsys):
    compute = train.compute_losses
    calls = {'n': 0}

    def nan_depth_in_epoch_2(*a):
        calls['n'] += 1
        losses = compute(*a)
        if calls['n'] == 3:
            losses['depth'] = losses['depth'] * float('nan')
        return losses

    monkeypatch.setattr(train, 'compute_losses', nan_depth_in_epoch_2)
    out = str(tmp_path / 'nan')
    assert train.main(tiny_args(synthetic_root, out, '--model=mtl', '--epochs=3', '--max_steps_per_epoch=2',
                                '--vis_images=0')) == 1
    err = capsys.readouterr().err
    assert 'depth loss is nan' in err and 'last good checkpoint' in err and 'Traceback' not in err
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert (ckpt['progress']['epoch'], ckpt['progress']['batches_done'], ckpt['progress']['step']) == (1, 0, 2)
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    assert read_log(out, 'error')[0]['step'] == 2


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save_checkpoint(path, {'epoch': 1})
    real_save = torch.save

    def crash_mid_write(obj, f):
        with open(f, 'wb') as fh:
            fh.write(b'half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', crash_mid_write)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(path, {'epoch': 2})
    monkeypatch.setattr(torch, 'save', real_save)
    assert torch.load(path) == {'epoch': 1}
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_missing_dataset_or_weights_give_the_loaders_message(synthetic_root, tmp_path, capsys):
    assert train.main(['--dataset=nyuv2', f'--data_root={tmp_path / "nowhere"}',
                       f'--out_dir={tmp_path / "a"}']) == 1
    err = capsys.readouterr().err
    assert 'Expected layout' in err and 'train/  image/0.npy' in err and 'mtan' in err
    assert 'Traceback' not in err
    assert train.main(tiny_args(synthetic_root, tmp_path / 'b', f'--pretrained={tmp_path / "w.pth"}')) == 1
    err = capsys.readouterr().err
    assert 'no file at' in err and 'Traceback' not in err


# ---------------------------------------------------------------------------------------------- torchrun

def write_nyuv2_fixture(root, n, size, seed=0):
    """NYUv2-format files whose images have very different numbers of valid pixels (image 0: depth on 1/16 of
    its rows; image 1: a quarter of its labels ignored; image 2: normals on half its columns), so that a mean
    of per-rank means would differ from the one-process mean over the batch's valid pixels."""
    rng = np.random.default_rng(seed)
    H, W = size
    for split in ('train', 'val'):
        for folder in ('image', 'label', 'depth', 'normal'):
            os.makedirs(os.path.join(root, split, folder))
        for i in range(n):
            normal = rng.normal(size=(H, W, 3))
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            arrays = {'image': rng.random((H, W, 3)), 'label': rng.integers(0, 13, (H, W)).astype(float),
                      'depth': rng.uniform(0.5, 5.0, (H, W, 1)), 'normal': normal}
            if i % 4 == 0:
                arrays['depth'][H // 16:] = 0
            if i % 4 == 1:
                arrays['label'][: H // 4] = -1
            if i % 4 == 2:
                arrays['normal'][:, W // 2:] = 0
            for folder, a in arrays.items():
                np.save(os.path.join(root, split, folder, f'{i}.npy'), a.astype(np.float32))


def first_step_gradients(out_dir):
    """The first step's (rank-averaged) gradients, read back from the run's checkpoint: after one Adam
    step (weight decay 0) the first moment is exp_avg = (1 - beta1) * gradient."""
    optimizer = torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=False)['optimizer']
    beta1 = optimizer['param_groups'][0]['betas'][0]
    return torch.cat([s['exp_avg'].flatten() for _, s in sorted(optimizer['state'].items())]) / (1 - beta1)


def test_torchrun_two_processes_give_the_one_process_gradients(tmp_path, monkeypatch):
    """Global batch 4: 2 gloo processes x 2 images vs 1 process x 4 images, first-step gradients.
    Float32 gradients of an untrained HRNet are sensitive: perturbing the input by 1e-7 (relative, the
    float32 rounding) moves them by ~2 %. So 'equal' means: no further from the 1-process gradients than
    that perturbation moves them, while without synchronised BatchNorm they are O(1) away."""
    root = str(tmp_path / 'nyu')
    write_nyuv2_fixture(root, 4, SIZE)
    args = [f'--data_root={root}', '--dataset=nyuv2', '--model=ctal_ss', '--ctal_impl=linear', '--epochs=1',
            '--max_steps_per_epoch=1', '--batch_size=4', '--vis_images=1', '--device=cpu', '--weight_decay=0']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)

    def torchrun(name, *extra):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               os.path.join(ROOT, 'train.py'), *args, f'--out_dir={tmp_path / name}', *extra]
        run = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert '2 process(es)' in run.stdout
        assert not [line for line in run.stderr.splitlines() if 'Warning' in line]
        return read_log(tmp_path / name)[0]['loss']

    loss_two = torchrun('two')
    loss_unsynced = torchrun('unsynced', '--sync_bn=False')
    with open(tmp_path / 'two' / 'results.json') as f:
        assert json.load(f)['versions']['world_size'] == 2
    assert os.path.exists(tmp_path / 'two' / 'vis_epoch001.png')

    assert train.main(args + [f'--out_dir={tmp_path / "one"}']) == 0
    to_device = train.to_device

    def perturbed(batch, device):
        batch = to_device(batch, device)
        noise = torch.randn(batch['image'].shape, generator=torch.Generator().manual_seed(1))
        return dict(batch, image=batch['image'] * (1 + 1e-7 * noise))

    monkeypatch.setattr(train, 'to_device', perturbed)
    assert train.main(args + [f'--out_dir={tmp_path / "pert"}']) == 0

    loss_one = read_log(tmp_path / 'one')[0]['loss']
    assert loss_two == pytest.approx(loss_one, rel=1e-5) and loss_unsynced != pytest.approx(loss_one, rel=1e-4)
    one = first_step_gradients(tmp_path / 'one')
    distance = lambda name: float((first_step_gradients(tmp_path / name) - one).norm() / one.norm())  # noqa: E731
    rounding = distance('pert')
    assert 0 < rounding < 0.1
    assert distance('two') < 3 * rounding
    assert distance('unsynced') > 10 * rounding


def test_batches_do_not_depend_on_the_number_of_workers(synthetic_root, tmp_path):
    """Augmentation is seeded per (seed, epoch, index): worker processes, kept alive across epochs (the epoch
    travels with each index), load the very same batches."""
    args = ['--model=mtl', '--epochs=2', '--max_steps_per_epoch=2', '--vis_images=0']
    assert train.main(tiny_args(synthetic_root, tmp_path / 'w0', *args, '--num_workers=0')) == 0
    assert train.main(tiny_args(synthetic_root, tmp_path / 'w2', *args, '--num_workers=2')) == 0
    assert [r['losses'] for r in read_log(tmp_path / 'w0')] == [r['losses'] for r in read_log(tmp_path / 'w2')]


def test_pascal_five_tasks_with_swin(tmp_path):
    """PASCAL-Context fixture (conftest's writer) padded to 64x64: all five tasks train and evaluate, and
    delta_m is taken against the papers' PASCAL Swin-V2-S STL numbers."""
    root = str(tmp_path / 'PASCAL_MT')
    rng = np.random.default_rng(0)
    for i in range(4):
        write_pascal_sample(root, f'2008_00000{i}', (40, 48), rng, person=i % 2 == 0)
    for i in range(2):
        write_pascal_sample(root, f'2009_00000{i}', (48, 40), rng, split='val')
    out = tmp_path / 'out'
    assert train.main([os.path.join(ROOT, 'configs', 'pascal_ctal_ss.py'), f'--data_root={root}', f'--out_dir={out}',
                       '--img_size=(64, 64)', '--epochs=2', '--batch_size=2', '--num_workers=0', '--vis_images=2',
                       '--log_interval=1']) == 0
    with open(out / 'results.json') as f:
        res = json.load(f)
    tasks = ('semseg', 'human_parts', 'saliency', 'normals', 'edge')
    assert tuple(res['final']['metrics']) == tasks
    assert 0 <= res['final']['metrics']['saliency']['maxF'] <= 100 and res['final']['metrics']['edge']['loss'] > 0
    assert res['reference']['values'] == {t: STL_REFERENCE[('pascal', 'swinv2_s')][t] for t in tasks}
    assert math.isfinite(res['final']['delta_m'])
    assert Image.open(out / 'vis_epoch002.png').size == (11 * 128, 16 + 2 * 128)   # input + 5 x (GT, pred)


def test_json_written_is_valid_json_nan_becomes_null():
    record = {'a': float('nan'), 'b': [1.0, float('inf'), {'c': -float('inf')}], 'd': (2, 'x'), 'e': 0.5}
    text = json.dumps(checkpoint.json_safe(record), allow_nan=False)
    assert json.loads(text) == {'a': None, 'b': [1.0, None, {'c': None}], 'd': [2, 'x'], 'e': 0.5}


def test_compile_trains_the_same_steps_as_eager(synthetic_root, tmp_path, monkeypatch):
    """--compile=True runs the training steps through torch.compile and computes the eager run's losses
    (float tolerance). Here with the aot_eager backend: the graph capture of the whole model and its
    backward without the C++ code generation, which takes minutes on a CPU (inductor: the slow test
    below)."""
    original = torch.compile
    compiled = []
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: compiled.append(m) or original(m, backend='aot_eager'))
    args = ['--model=mtl', '--epochs=1', '--max_steps_per_epoch=3', '--vis_images=0', '--augment=False']
    assert train.main(tiny_args(synthetic_root, str(tmp_path / 'eager'), *args)) == 0
    assert compiled == []
    assert train.main(tiny_args(synthetic_root, str(tmp_path / 'compiled'), *args, '--compile=True')) == 0
    assert len(compiled) == 1
    eager, comp = read_log(str(tmp_path / 'eager')), read_log(str(tmp_path / 'compiled'))
    assert len(eager) == len(comp) == 3
    assert comp[0]['loss'] == pytest.approx(eager[0]['loss'], rel=1e-6)          # the same weights: same loss
    # later steps drift apart slowly: Adam turns rounding noise in gradients that are exactly 0 in theory
    # (the biases of convolutions followed by BatchNorm) into full +-lr steps of either sign
    for a, b in zip(eager[1:], comp[1:]):
        assert b['loss'] == pytest.approx(a['loss'], rel=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize('model', ('mtl', 'ctal_ss'))
def test_inductor_compiled_model_equals_eager(model):
    """The default torch.compile (inductor) on CPU computes the eager model's function: in float64 the outputs
    and every parameter gradient of one forward+backward agree to 1e-10; in float32 the outputs to 1e-4.
    (float32 gradients are not compared: here they sit up to 7.5e-4 from the float64 ones in eager mode and
    1.6e-5 compiled, so their difference measures the rounding of this random net, not the compiler.)
    BatchNorm in eval mode: with batch statistics over the 2 x 2 positions of the 1/32 branch the backward
    is badly conditioned."""
    from model import build_model
    torch.manual_seed(0)
    tasks = {'semseg': 5, 'depth': 1, 'normals': 3}
    net = build_model(model, tasks, (64, 64), scale=1 / 8, ctal_impl='linear').eval()
    x = torch.rand(2, 3, 64, 64)

    def step(m, x):
        out = m(x)
        sum(out[t].square().mean() for t in tasks).backward()
        grads = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in net.parameters()])
        net.zero_grad(set_to_none=True)
        return torch.cat([out[t].detach().flatten() for t in tasks]), grads
    out, c_out = step(net, x)[0], step(torch.compile(net), x)[0]
    assert float((c_out - out).norm() / out.norm()) < 1e-4
    net = net.double()
    (out, grads), (c_out, c_grads) = step(net, x.double()), step(torch.compile(net), x.double())
    assert float((c_out - out).norm() / out.norm()) < 1e-10
    assert float((c_grads - grads).norm() / grads.norm()) < 1e-10


def test_genotype_file_is_read_into_the_config(tmp_path):
    """--genotype=FILE: the JSON's contents go into the config (so config.json and the checkpoints carry
    the genotype itself); a file that cannot be read is one clear message."""
    path = tmp_path / 'g.json'
    path.write_text(json.dumps({'semseg': {'semseg': 3, 'depth': 1}, 'depth': {'semseg': 4, 'depth': 0}}))
    cfg = train.parse_config(['--model=atrc', '--tasks=semseg,depth', f'--genotype={path}'])
    assert cfg['genotype'] == {'semseg': {'semseg': 3, 'depth': 1}, 'depth': {'semseg': 4, 'depth': 0}}
    (tmp_path / 'bad.json').write_text('{"semseg": ')
    for name in ('bad.json', 'missing.json'):
        with pytest.raises(train.UserError, match=f"genotype=.*{name}.*cannot read it as a JSON file"):
            train.parse_config(['--model=atrc', f'--genotype={tmp_path / name}'])


# ---------------------------------------------------------------------------------------------- NYUD_MT

def test_nyud_atrc_config_trains_and_evaluates_on_the_release_formats(tmp_path):
    """configs/nyud_atrc.py end to end on a NYUD_MT fixture in the release's formats (30x44 images on a 32x48
    canvas): ATRC's recipe (SGD, poly per step, iterations), four tasks with the edge loss at ATRC's NYUD
    weight 0.8, delta_m against ATRC's single task on semseg / depth RMSE / normals (no odsF)."""
    from conftest import write_nyud_sample
    root = str(tmp_path / 'NYUD_MT')
    rng = np.random.default_rng(0)
    for i in range(4):
        write_nyud_sample(root, f'{i:04d}', (30, 44), rng, split='train' if i < 3 else 'val')
    out = tmp_path / 'out'
    args = [os.path.join(ROOT, 'configs', 'nyud_atrc.py'), f'--data_root={root}', f'--out_dir={out}', '--img_size=32x48',
            '--iters=3', '--batch_size=2', '--num_workers=0', '--vis_images=1', '--log_interval=1']
    assert train.main(args) == 0
    with open(out / 'results.json') as f:
        res = json.load(f)
    cfg = res['config']
    assert (cfg['dataset'], cfg['model'], cfg['optimizer'], cfg['scheduler'], cfg['normals_loss']) == \
        ('nyud', 'atrc', 'sgd', 'poly', 'l1')
    assert cfg['loss_weights'] == {'semseg': 1.0, 'depth': 1.0, 'normals': 10.0, 'edge': 50.0}
    assert (res['epochs'], res['steps']) == (3, 3)                       # 1 step per epoch (3 images, batch 2)
    final = res['final']['metrics']
    assert set(final) == {'semseg', 'depth', 'normals', 'edge'} and 'rmse' in final['depth']
    ref = res['reference']['values']
    assert ref == {'semseg': 38.02, 'depth': 0.6104, 'normals': 20.94}
    expected = 100 / 3 * ((final['semseg']['mIoU'] - 38.02) / 38.02 - (final['depth']['rmse'] - 0.6104) / 0.6104
                          - (final['normals']['mean'] - 20.94) / 20.94)
    assert res['final']['delta_m'] == pytest.approx(expected, rel=1e-9)
    assert train.loss_options(Config(cfg)) == {'normals_form': 'l1', 'edge_pos_weight': 0.8}
    assert train.loss_options(Config(cfg, dataset='pascal'))['edge_pos_weight'] == 0.95
    assert os.path.isfile(out / 'vis_epoch003.png')


@pytest.mark.parametrize('model', ['atrc', 'tif'])
def test_atrc_and_tif_train_on_synthetic_scenes_in_the_nyud_layout(model, tmp_path):
    """The whole NYUD route without a download: synthetic.py --layout nyud_mt, then the model's nyud config
    for a few steps (its recipe), the loss going down on the 4 training scenes."""
    from synthetic import make_synthetic
    root = make_synthetic(str(tmp_path / 'syn'), 4, 2, (32, 48), seed=0, layout='nyud_mt')
    out = tmp_path / model
    assert train.main([os.path.join(ROOT, 'configs', f'nyud_{model}.py'), f'--data_root={root}', f'--out_dir={out}',
                       '--img_size=32x48', '--iters=8', '--batch_size=4', '--augment=False', '--num_workers=0',
                       '--vis_images=0', '--log_interval=1', '--lr=0.005', '--hrnet_bn_momentum=0.1']) == 0
    losses = [r['loss'] for r in read_log(out)]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert [e['epoch'] for e in read_log(out, 'eval')] == [8]


# ---------------------------------------------------------------------------------------------- accumulation

def step_of(root, out, accum, frozen_bn, *extra):
    """One train_step of ctal_ss on a fixed batch of 8 whose images have very different numbers of valid
    pixels; (its losses, the gradients)."""
    cfg = train.parse_config(tiny_args(root, out, '--model=ctal_ss', '--batch_size=8', f'--grad_accum_steps={accum}',
                                       '--augment=False', *extra))
    run, _ = train.setup(cfg)
    batch = next(iter(torch.utils.data.DataLoader(run.train_set, batch_size=8)))
    batch['depth'][0, :, 4:] = 0                         # image 0: 4 of 32 rows with depth, the others all
    batch['normals'][1:3, :, :, 8:] = 0
    batch['semseg'][5, 2:] = 255
    if frozen_bn:
        for m in run.raw_model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    losses = train.train_step(run, batch)
    return losses, torch.cat([p.grad.flatten() for p in run.raw_model.parameters() if p.grad is not None])


def test_gradient_accumulation_computes_the_one_batch_step(synthetic_root, tmp_path):
    """grad_accum_steps=4 (micro-batches of 2) equals one batch of 8 to float rounding when BatchNorm uses
    its running statistics: every masked loss is divided by the valid pixels of the whole batch. With BN in
    training mode the steps differ, as they must: each micro-batch normalises by its own statistics."""
    one, g_one = step_of(synthetic_root, tmp_path / 'one', 1, True)
    four, g_four = step_of(synthetic_root, tmp_path / 'four', 4, True)
    assert four == pytest.approx(one, rel=1e-6)
    assert float((g_four - g_one).norm() / g_one.norm()) < 1e-5
    _, g_bn_one = step_of(synthetic_root, tmp_path / 'bn1', 1, False)
    _, g_bn_four = step_of(synthetic_root, tmp_path / 'bn4', 4, False)
    assert float((g_bn_four - g_bn_one).norm() / g_bn_one.norm()) > 1e-2


def test_accumulation_needs_a_batch_that_splits_evenly(synthetic_root, tmp_path, capsys):
    assert train.main(tiny_args(synthetic_root, tmp_path / 'r', '--batch_size=6', '--grad_accum_steps=4')) == 1
    assert "batch_size=6 (the global batch) must divide into 1 process(es) x grad_accum_steps=4" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'r')


def test_evaluation_prints_its_progress(synthetic_root, tmp_path, capsys):
    """A line every eval_log_interval batches (4 val images, batch 2 -> 2 batches: one line before the last)."""
    assert train.main(tiny_args(synthetic_root, tmp_path / 'r', '--model=mtl', '--epochs=1', '--max_steps_per_epoch=1',
                                '--eval_log_interval=1', '--vis_images=0')) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('  eval batch')]
    assert len(lines) == 1 and lines[0].startswith('  eval batch 1/2 | ') and 'img/s | ETA' in lines[0]


def test_multiscale_initial_predictions_are_scored_per_scale(synthetic_root, tmp_path):
    """ctal_ms's 4 per-scale initial predictions each get the meters; their metrics equal the meters run by hand
    on the model's out['initial'] over the val split."""
    out = tmp_path / 'ms'
    assert train.main(tiny_args(synthetic_root, out, '--model=ctal_ms', '--epochs=1', '--max_steps_per_epoch=1',
                                '--vis_images=0', '--tasks=semseg,depth')) == 0
    initial = read_log(out, 'eval')[-1]['initial_metrics']
    assert sorted(initial) == sorted(f'{t}@1/{s}' for t in ('semseg', 'depth') for s in (4, 8, 16, 32))
    cfg = train.parse_config(tiny_args(synthetic_root, tmp_path / 'again', '--model=ctal_ms', '--tasks=semseg,depth',
                                       f'--init_from={out}/ckpt.pt', '--eval_only=True'))
    run, _ = train.setup(cfg)
    run.raw_model.eval()
    meters = build_meters({'depth': 1})
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(run.val_set, batch_size=2):
            meters['depth'].update(run.raw_model(batch['image'])['initial']['depth'][1], batch['depth'])
    assert meters['depth'].compute() == pytest.approx(initial['depth@1/8'], rel=1e-6)


def test_cuda_speed_switches_follow_tf32(monkeypatch):
    """pick_device sets TF32 and cuDNN's autotuner for a CUDA device only (CPU runs keep torch's defaults)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = False
        assert model.pick_device('cpu', tf32=True) == torch.device('cpu')
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        for tf32 in (True, False):
            assert model.pick_device('cuda:1', tf32=tf32) == torch.device('cuda', 1)
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
            assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved
