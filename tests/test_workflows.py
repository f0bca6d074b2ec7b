"""What a user meets around training: mistakes refused with one message before any work (exit code 1, no
traceback, the out_dir untouched), resume after a SIGKILL in a checkpoint write, eval-only, best.pt,
fine-tuning from a checkpoint (init_from), and predict on the user's own images.

Everything runs on CPU on a tiny synthetic set (32x64) written into tmp folders."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import model
import predict
import train
from synthetic import make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (32, 64)


@pytest.fixture(scope='module')
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('synthetic'))
    os.rmdir(root)
    return make_synthetic(root, 8, 4, SIZE, seed=0)


def tiny_args(root, out, *extra):
    return [f'--data_root={root}', f'--out_dir={out}', '--n_train=8', '--n_val=4', f'--synthetic_size={SIZE}',
            '--batch_size=2', '--vis_images=2', '--log_interval=1', '--lr=1e-3', '--ctal_impl=linear',
            '--model=mtl', '--max_steps_per_epoch=2', *extra]


@pytest.fixture(scope='module')
def finished_run(synthetic_root, tmp_path_factory):
    """A 3-epoch mtl run evaluated every epoch, with an STL reference, so best.pt follows delta_m."""
    tmp = tmp_path_factory.mktemp('run')
    stl = {'config': {'dataset': 'synthetic'},
           'final': {'metrics': {'semseg': {'mIoU': 5.0}, 'depth': {'rel_err': 0.5}, 'normals': {'mean': 40.0}}}}
    (tmp / 'stl.json').write_text(json.dumps(stl))
    args = tiny_args(synthetic_root, tmp / 'out', '--epochs=3', f'--stl_results={tmp / "stl.json"}')
    assert train.main(args) == 0
    return args, tmp / 'out'


def folder_hash(path):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        digest.update(name.encode())
        with open(os.path.join(path, name), 'rb') as f:
            digest.update(f.read())
    return digest.hexdigest()


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def refused(argv, words, capsys, out_dir=None):
    """train.py refuses argv: exit code 1, one error line naming `words`, no traceback, out_dir untouched."""
    before = folder_hash(out_dir) if out_dir else None
    assert train.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.startswith('error: ')
    for word in words:
        assert word in err, err
    if out_dir:
        assert folder_hash(out_dir) == before
    return err


# ---------------------------------------------------------------------------------------- mistakes

@pytest.mark.parametrize('text, words', [
    ("model = 'mtl'\nepochs = = 3\n", ['line 2', 'SyntaxError']),
    ("model = mtl\n", ['line 1', "NameError", "name 'mtl' is not defined", 'strings need quotes']),
    ("epochs = 1 / 0\n", ['line 1', 'ZeroDivisionError']),
    ("lr = '1e-4'\n", ["lr='1e-4': expected a number"]),
    ("modle = 'mtl'\n", ["unknown key 'modle'"]),
])
def test_bad_config_file(text, words, tmp_path, capsys):
    config = tmp_path / 'bad.py'
    config.write_text(text)
    refused([config, f'--out_dir={tmp_path / "out"}'], [str(config)] + words, capsys)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('argv, words', [
    (['--lrr=1'], ["unknown key 'lrr'", 'did you mean lr']),
    (['--synthetic_size=(20, 20)'], ['synthetic_size', 'each >= 32']),
    (['--resume=True', '--eval_only=True'], ['pick one']),
    (['--device=cuda:x'], ["device='cuda:x'"]),
])
def test_bad_values_before_any_work(argv, words, tmp_path, capsys):
    refused(argv + [f'--out_dir={tmp_path / "out"}', f'--data_root={tmp_path / "data"}'], words, capsys)
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'data').exists()


@pytest.mark.parametrize('argv, words', [
    (['--model=ctal_ss', '--scale=1/2'], ['scale=0.5', 'must be in (0, 1/4]']),
    (['--model=ctal_ss', '--gamma=2'], ['gamma must be in [0, 1]']),
])
def test_bad_model_arguments_before_any_file_is_written(argv, words, synthetic_root, tmp_path, capsys):
    """build_model / CTAL check their own arguments; train.py refuses the run before out_dir exists."""
    refused(tiny_args(synthetic_root, tmp_path / 'out', *argv), words, capsys)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('kind, words', [
    ('not a checkpoint', ['cannot be loaded into hrnet_w18_small_v2']),
    ('another architecture', ['matched no parameter of hrnet_w18_small_v2']),
    ('own checkpoint', ['cannot be loaded into hrnet_w18_small_v2', 'goes to init_from']),
])
def test_bad_pretrained_file(kind, words, synthetic_root, finished_run, tmp_path, capsys):
    path = tmp_path / 'weights.pth'
    if kind == 'not a checkpoint':
        path.write_text('these are not weights')
    elif kind == 'another architecture':
        torch.save({'encoder.layer1.weight': torch.zeros(8, 3, 3, 3)}, path)
    else:
        path = finished_run[1] / 'ckpt.pt'
    refused(tiny_args(synthetic_root, tmp_path / 'out', f'--pretrained={path}'), words, capsys)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('content, words', [
    (b'', ['not a readable checkpoint']),
    (b'\x80\x02garbage', ['not a readable checkpoint']),
    ('truncated', ['not a readable checkpoint']),
    ('weights only', ["holds weights only (best.pt)"]),
    ('other model', ["model: run 'mtl', now 'stl'"]),
])
def test_bad_checkpoint_on_resume(content, words, synthetic_root, finished_run, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    for name in ('config.json', 'log.jsonl'):
        (out / name).write_bytes((finished_run[1] / name).read_bytes())
    good = (finished_run[1] / 'ckpt.pt').read_bytes()
    extra = []
    if content == 'truncated':
        content = good[:len(good) // 2]
    elif content == 'weights only':
        content = (finished_run[1] / 'best.pt').read_bytes()
    elif content == 'other model':
        content, extra = good, ['--model=stl']
    (out / 'ckpt.pt').write_bytes(content)
    refused(tiny_args(synthetic_root, out, '--epochs=4', '--resume=True', *extra), words, capsys, out)


def corrupt_sample(root, kind):
    path = os.path.join(root, 'train', 'depth', '3.npy')
    if kind == 'missing':
        os.remove(path)
    elif kind == 'garbage':
        with open(path, 'wb') as f:
            f.write(b'garbage')
    elif kind == 'shape':
        np.save(path, np.ones((16, 64, 1), np.float32))
    else:                                         # NaN: the header is fine, the values are not
        depth = np.load(path)
        depth[5, 7] = np.nan
        np.save(path, depth)
    return path


@pytest.mark.parametrize('kind, words', [
    ('missing', ['missing sample file']),
    ('garbage', ['cannot read', 'as a numpy .npy array']),
    ('shape', ['shape (16, 64, 1)', 'expected numbers of shape (32, 64']),
    ('nan', ['data:', 'depth holds 1 NaN / inf values']),
])
def test_bad_dataset_file(kind, words, tmp_path, capsys):
    root = make_synthetic(str(tmp_path / 'data'), 8, 4, SIZE, seed=0)
    path = corrupt_sample(root, kind)
    out = tmp_path / 'out'
    refused(tiny_args(root, out, '--epochs=2'), [path] + words, capsys)
    # structural faults are found before the run starts; a NaN only when the sample is read
    assert out.exists() == (kind == 'nan')


def test_out_dir_of_another_run_is_refused(synthetic_root, finished_run, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    for name in ('config.json', 'log.jsonl', 'results.json', 'vis_epoch001.png'):   # a run whose ckpt.pt is gone
        (out / name).write_bytes((finished_run[1] / name).read_bytes())
    refused(tiny_args(synthetic_root, out, '--epochs=1'), ['holds another run', 'cannot be resumed'], capsys, out)
    refused(tiny_args(synthetic_root, finished_run[1], '--epochs=1'), ['--resume=True continues it'], capsys,
            finished_run[1])
    refused(tiny_args(synthetic_root, tmp_path / 'new', '--eval_only=True'), ['no checkpoint at'], capsys)


# ---------------------------------------------------------------------------------------- workflows

SIGKILL_IN_SECOND_CHECKPOINT = """
import os, signal, torch
_save, _count = torch.save, [0]
def save(obj, f, *args, **kwargs):
    if str(f).endswith('ckpt.pt.tmp'):
        _count[0] += 1
        if _count[0] == 2:                        # half the file written, then the process is killed
            with open(f, 'wb') as fh:
                fh.write(b'half a checkpoint')
            os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = save
"""


def test_resume_after_sigkill_in_a_checkpoint_write_leaves_no_duplicate_records(synthetic_root, tmp_path):
    args = tiny_args(synthetic_root, tmp_path / 'killed', '--epochs=3')
    hook = tmp_path / 'hook'
    hook.mkdir()
    (hook / 'sitecustomize.py').write_text(SIGKILL_IN_SECOND_CHECKPOINT)
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{ROOT}", OMP_NUM_THREADS='1')
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *map(str, args)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -9, run.stderr[-2000:]
    killed = tmp_path / 'killed'
    assert torch.load(killed / 'ckpt.pt', weights_only=False)['progress']['epoch'] == 1
    assert max(r['epoch'] for r in read_log(killed) if r['type'] == 'eval') == 2     # logged after the checkpoint
    # the resumed and the uninterrupted run go through the same interpreter settings as the killed one (one
    # thread), so the float sums agree to the last bit
    plain = dict(env, PYTHONPATH=ROOT)
    for extra in (['--resume=True'], [f'--out_dir={tmp_path / "whole"}']):
        run = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *map(str, args), *extra], env=plain,
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
    key = lambda r: (r['type'], r['step'], r.get('loss'), json.dumps(r.get('metrics')))    # noqa: E731
    assert [key(r) for r in read_log(killed)] == [key(r) for r in read_log(tmp_path / 'whole')]


def test_eval_only_reproduces_the_final_metrics(finished_run, capsys):
    args, out = finished_run
    ckpt = (out / 'ckpt.pt').read_bytes()
    assert train.main(args + ['--eval_only=True']) == 0
    with open(out / 'results.json') as f:
        final = json.load(f)['final']
    with open(out / 'eval.json') as f:
        scored = json.load(f)
    assert scored['metrics'] == final['metrics'] and scored['delta_m'] == final['delta_m']
    assert scored['val_loss'] == final['val_loss']
    assert Image.open(out / 'vis_eval.png').size == Image.open(out / 'vis_epoch003.png').size
    assert (out / 'ckpt.pt').read_bytes() == ckpt                       # the run's files are not touched


def test_best_checkpoint_holds_the_best_epoch(finished_run, tmp_path):
    """best.pt = the weights of the epoch with the highest delta_m; scoring it gives that epoch's metrics."""
    args, out = finished_run
    evals = [r for r in read_log(out) if r['type'] == 'eval']
    best_epoch = max(evals, key=lambda r: r['delta_m'])['epoch']
    with open(out / 'results.json') as f:
        assert json.load(f)['best']['epoch'] == best_epoch
    best = torch.load(out / 'best.pt', weights_only=False)
    assert best['eval']['epoch'] == best_epoch and best['input_size'] == list(SIZE)
    scored = tmp_path / 'scored'
    assert train.main(args[:1] + [f'--out_dir={scored}'] + args[2:] +
                      ['--eval_only=True', f'--init_from={out / "best.pt"}']) == 0
    with open(scored / 'eval.json') as f:
        assert json.load(f)['metrics'] == next(r for r in evals if r['epoch'] == best_epoch)['metrics']


def test_init_from_fine_tunes_a_trained_checkpoint(synthetic_root, finished_run, tmp_path, capsys):
    args, out = finished_run
    scratch, tuned = tmp_path / 'scratch', tmp_path / 'tuned'
    assert train.main(tiny_args(synthetic_root, scratch, '--epochs=1')) == 0
    assert train.main(tiny_args(synthetic_root, tuned, '--epochs=1', f'--init_from={out / "ckpt.pt"}')) == 0
    first = lambda d: read_log(d)[0]['loss']                    # noqa: E731
    assert first(tuned) < 0.8 * first(scratch)
    ckpt = torch.load(tuned / 'ckpt.pt', weights_only=False)
    assert ckpt['optimizer']['state'][0]['step'] == 2           # a fresh optimiser: this run's 2 steps
    # resuming a fine-tuning run continues from its own ckpt.pt, not from the init_from checkpoint
    assert train.main(tiny_args(synthetic_root, tuned, '--epochs=2', f'--init_from={out / "ckpt.pt"}',
                                '--resume=True')) == 0
    assert [r['epoch'] for r in read_log(tuned) if r['type'] == 'eval'] == [1, 2]
    refused(tiny_args(synthetic_root, tmp_path / 'other', '--model=stl', f'--init_from={out / "ckpt.pt"}'),
            ['does not fit this model', "'model': 'mtl'"], capsys)


def test_predict_writes_one_coloured_picture_per_image(finished_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in (('a.png', (40, 50)), ('b.png', (64, 64))):
        paths.append(str(tmp_path / name))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    assert predict.main([str(finished_run[1] / 'best.pt'), *paths, f'--out_dir={tmp_path / "pred"}']) == 0
    written = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in written] == ['a_pred.png', 'b_pred.png']
    for path, (h, w) in zip(written, ((40, 50), (64, 64))):
        png = np.asarray(Image.open(path).convert('RGB'))
        assert png.shape[:2] == (16 + 128, 4 * round(w * 128 / h))        # input + semseg, depth, normals
        assert len(np.unique(png.reshape(-1, 3), axis=0)) > 20            # coloured, not blank
    assert predict.main([str(finished_run[1] / 'config.json'), paths[0]]) == 1
    assert 'not a readable checkpoint' in capsys.readouterr().err


def test_predict_prepares_a_pascal_image_as_the_evaluation_does():
    """On a PASCAL-Context checkpoint predict.py feeds the model the evaluation's canvas (the 29x37 image
    centred at (17, 13) on the mean colour of a 64x64 canvas, normalised by the model) and cuts each
    prediction back to the image, instead of stretching the image to the canvas."""
    import data
    cfg = {'dataset': 'pascal', 'model': 'mtl', 'tasks': ['semseg', 'saliency'], 'backbone': 'hrnet18',
           'pretrained': None, 'scale': 0.25, 'gamma': 0.05, 'ctal_impl': 'auto', 'ctal_fusion': 'shared',
           'pap_iters': 1, 'pap_affinity': 'code', 'fpm_softmax': 'code', 'hrnet_bn_momentum': None,
           'genotype': None, 'search': False}
    torch.manual_seed(0)
    net = model.build_net(cfg, (64, 64), torch.device('cpu')).eval()
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    image = torch.rand(3, 29, 37)
    with torch.no_grad():
        pred = predict.predict_image(net, image, cfg, (64, 64), torch.device('cpu'))
        canvas = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1).repeat(1, 64, 64)
        canvas[:, 17:46, 13:50] = image
        assert len(seen) == 1 and torch.equal(seen[0], canvas[None])
        out = net(canvas[None])
    for t in cfg['tasks']:
        assert pred[t].shape[-2:] == (29, 37)
        assert torch.equal(pred[t], out[t][..., 17:46, 13:50])


# ---------------------------------------------------------------------------------------------- safe files

class Payload:
    """An object whose unpickling would run code (what a malicious checkpoint holds)."""

    def __reduce__(self):
        return (os.system, ('touch PWNED',))


def test_a_checkpoint_holding_a_pickled_callable_is_refused_everywhere(finished_run, tmp_path, capsys, monkeypatch):
    """Every entry point loads with weights_only=True: resume, init_from, eval_only and predict.py refuse a
    ckpt.pt whose pickle calls os.system, with one line and exit 1, and nothing runs; the run's own
    ckpt.pt / best.pt still load (eval_only, predict)."""
    monkeypatch.chdir(tmp_path)
    args, out = finished_run
    good = torch.load(out / 'ckpt.pt', weights_only=True)
    bad_dir = tmp_path / 'bad'
    bad_dir.mkdir()
    torch.save(dict(good, extra=Payload()), bad_dir / 'ckpt.pt')
    words = ['is refused: it holds a pickled Python object (posix.system)', 'could run code']
    refused(args[:-1] + [f'--out_dir={bad_dir}', '--resume=True'], words, capsys)
    refused(args + [f'--out_dir={tmp_path / "tuned"}', f'--init_from={bad_dir / "ckpt.pt"}'], words, capsys)
    refused(args + [f'--out_dir={tmp_path / "scored"}', f'--init_from={bad_dir / "ckpt.pt"}', '--eval_only=True'],
            words, capsys)
    image = tmp_path / 'x.png'
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(image)
    assert predict.main([str(bad_dir / 'ckpt.pt'), str(image), f'--out_dir={tmp_path / "pred"}']) == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err and words[0] in err
    assert not (tmp_path / 'PWNED').exists() and not (tmp_path / 'pred').exists()
    assert train.main(args + [f'--out_dir={tmp_path / "ok"}', f'--init_from={out / "best.pt"}', '--eval_only=True']) == 0
    assert predict.main([str(out / 'best.pt'), str(image), f'--out_dir={tmp_path / "pred"}']) == 0


def test_a_crash_while_json_is_written_leaves_the_previous_file(tmp_path, monkeypatch):
    """write_json goes through a temporary file and os.replace: killed mid-write (simulated: the write
    raises after half of the text), results.json is the previous one and no temporary file stays."""
    import checkpoint
    path = str(tmp_path / 'results.json')
    checkpoint.write_json(path, {'final': 1})

    def half_then_die(file, text):
        with open(file, 'w') as f:
            f.write(text[:len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, '_write_text', half_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_json(path, {'final': 2, 'more': list(range(100))})
    with open(path) as f:
        assert json.load(f) == {'final': 1}
    assert os.listdir(tmp_path) == ['results.json']
