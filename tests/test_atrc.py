"""ATRC (Adaptive Task-Relational Context): the paper's parameter counts and MACs in its NYUD-v2 setting,
each context block against its definition in float64 (the explicit normalised kernel matrix, a position-by-
position window loop with the zero-logit border, explicit prototypes), ATRC adding nothing at
initialisation, the genotype format, and the auxiliary losses on discretised targets."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from atrc import (ATRCDistillation, GlobalContext, LabelContext, LocalContext, atrc_genotype, aux_loss, discretise,
                  normals_centroids)
from conftest import n_params, randomise
from model import build_model

NYUD = {'semseg': 40, 'depth': 1, 'normals': 3, 'edge': 1}       # the ATRC paper's NYUD-v2 tasks
PASCAL = {'semseg': 21, 'human_parts': 7, 'saliency': 1, 'normals': 3, 'edge': 1}
TOL = dict(rtol=0, atol=1e-10)


def everywhere(context):
    return {t: {s: context for s in NYUD} for t in NYUD}


# ----------------------------------------------------------------------------------------------------
# the paper's Table 1 (NYUD-v2, HRNet-18, 425x560)

def test_parameter_counts_are_the_papers():
    """ATRC 5.06 M with the authors' NYUD genotype, global / local context 4.73 M, the multi-task baseline
    (backbone, F_t and logits, no distillation) 4.52 M: exactly the counts of the authors' code."""
    atrc = build_model('atrc', NYUD, (425, 560))
    assert n_params(atrc) == 5_060_994
    assert n_params(build_model('atrc', NYUD, (425, 560), genotype=everywhere('global'))) == 4_734_172
    assert n_params(build_model('atrc', NYUD, (425, 560), genotype=everywhere('local'))) == 4_734_172
    assert n_params(atrc.backbone) + n_params(atrc.features) + n_params(atrc.logits) == 4_515_556
    # the dataset nyud is this setting; ATRC's baselines as models (their FCNHead): 4.52 M and 16.09 M (Tab. 1)
    from data import DATASETS
    assert (DATASETS['nyud']['tasks'], DATASETS['nyud']['size']) == (NYUD, (425, 560))
    baseline = build_model('atrc_mtl', NYUD, (425, 560))
    assert n_params(baseline) == 4_515_556 and n_params(build_model('atrc_stl', NYUD, (425, 560))) == 16_097_716
    assert set(baseline.state_dict()) <= set(atrc.state_dict())          # ATRC = the baseline + its distillation
    # PASCAL-Context: the authors' 5,383,142 has a 2-channel saliency output; ours has 1 (67 + 1 weights fewer)
    assert n_params(build_model('atrc', dict(PASCAL, saliency=2), (512, 512))) == 5_383_142
    assert n_params(build_model('atrc', PASCAL, (512, 512))) == 5_383_142 - 68


def test_macs_are_within_5_percent_of_the_papers():
    """Multiply-accumulates per image, profile.py's counter: ATRC 25.76 G, global 21.43, local 22.19, the
    multi-task baseline 17.59 (its backbone, F_t and logits)."""
    from profile import flop_counter

    def gmacs(genotype=None):
        model = build_model('atrc', NYUD, (425, 560), genotype=genotype).eval()
        with flop_counter() as counter, torch.no_grad():
            model(torch.rand(1, 3, 425, 560))
        counts = counter.get_flop_counts()
        base = sum(sum(v.values()) for k, v in counts.items()
                   if k == 'ATRC.backbone' or k.count('.') == 2 and k.startswith(('ATRC.features.', 'ATRC.logits.')))
        return counter.get_total_flops() / 2e9, base / 2e9
    atrc, baseline = gmacs()
    assert atrc == pytest.approx(25.76, rel=0.05) and baseline == pytest.approx(17.59, rel=0.05)
    assert gmacs(everywhere('global'))[0] == pytest.approx(21.43, rel=0.05)
    assert gmacs(everywhere('local'))[0] == pytest.approx(22.19, rel=0.05)


# ----------------------------------------------------------------------------------------------------
# the context blocks against their definitions

def features(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def test_global_context_is_the_normalised_kernel_matrix():
    block = randomise(GlobalContext(6, 4).double())
    target, source = features(1, (2, 6, 3, 5), (2, 6, 3, 5))
    q, k, v = (m(x).flatten(2) for m, x in ((block.query, target), (block.key, source), (block.value, source)))
    kernel = q.transpose(1, 2) @ k                                       # (B, L, L): <q_i, k_j>, explicit
    weights = kernel / kernel.sum(-1, keepdim=True)
    expected = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 4, 3, 5)
    assert (q > 0).all() and (k > 0).all()                              # softplus features: weights > 0
    torch.testing.assert_close(block(target, source), expected, **TOL)


def test_local_context_is_a_9x9_window_softmax_with_zero_logits_outside():
    block = randomise(LocalContext(6, 4).double())
    target, source = features(2, (1, 6, 5, 11), (1, 6, 5, 11))
    with torch.no_grad():
        q, k, v = block.query(target)[0], block.key(source)[0], block.value(source)[0]   # (d, h, w)
    d, h, w = q.shape
    expected = torch.zeros(d, h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            logits, values = [], []
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    inside = 0 <= y + dy < h and 0 <= x + dx < w
                    logits.append(float(q[:, y, x] @ k[:, y + dy, x + dx]) / math.sqrt(d) if inside else 0.0)
                    values.append(v[:, y + dy, x + dx] if inside else torch.zeros(d, dtype=torch.float64))
            weights = torch.tensor(logits, dtype=torch.float64).softmax(0)
            expected[:, y, x] = sum(wt * val for wt, val in zip(weights, values))
    torch.testing.assert_close(block(target, source)[0], expected, **TOL)


def test_label_context_attends_to_explicit_prototypes():
    block = randomise(LabelContext(6, 4).double())
    target, source, logits = features(3, (2, 6, 3, 4), (2, 6, 3, 4), (2, 5, 3, 4))
    regions = logits.flatten(2).softmax(-1)                              # Â: (B, R, L)
    prototypes = torch.stack([torch.stack([(regions[b, r][None] * source[b].flatten(1)).sum(1) for r in range(5)])
                              for b in range(2)])                       # (B, R, C): sum_i Â_r(i) F_s(i)
    k = block.key(prototypes.transpose(1, 2)[..., None]).flatten(2)      # (B, d, R)
    v = block.value(prototypes.transpose(1, 2)[..., None]).flatten(2)
    q = block.query(target).flatten(2)                                   # (B, d, L)
    attention = torch.softmax(torch.einsum('bdi,bdr->bir', q, k) / 2.0, -1)     # sqrt(d) = 2
    expected = torch.einsum('bdr,bir->bdi', v, attention).reshape(2, 4, 3, 4)
    torch.testing.assert_close(block(target, source, regions), expected, **TOL)


def test_atrc_adds_nothing_at_initialisation():
    """The projection's BN starts at weight 0 and bias 0: the output is the network with the contexts
    removed (the bottleneck then sees F_t and zeros), exactly."""
    torch.manual_seed(0)
    model = build_model('atrc', {'semseg': 5, 'depth': 1, 'normals': 3}, (64, 96)).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        xs = model.backbone(x)
        shared = torch.cat([xs[0]] + [F.interpolate(f, xs[0].shape[-2:], mode='bilinear') for f in xs[1:]], 1)
        for t in ('semseg', 'depth', 'normals'):
            f = model.features[t](shared)
            conv, bn = model.distill.bottleneck[t][0][0], model.distill.bottleneck[t][0][1]
            y = torch.relu(bn(F.conv2d(f, conv.weight[:, :f.shape[1]])))     # the half that reads F_t
            expected = F.interpolate(model.logits[t](y), (64, 96), mode='bilinear')
            assert torch.equal(out[t], expected), t


# ----------------------------------------------------------------------------------------------------
# genotypes

def test_genotype_rows_are_targets_and_the_authors_ids_load():
    tasks = {'semseg': 3, 'depth': 1}
    ids = {'semseg': {'semseg': 0, 'depth': 4}, 'depth': {'semseg': 1, 'depth': 3}}    # the authors' format
    assert atrc_genotype(ids, tasks) == {'semseg': {'semseg': 'none', 'depth': 'slabel'},
                                         'depth': {'semseg': 'global', 'depth': 'tlabel'}}
    distill = ATRCDistillation(tasks, ids, 8, 4)
    assert set(distill.blocks['semseg']) == {'depth'} and set(distill.blocks['depth']) == {'semseg', 'depth'}
    assert isinstance(distill.blocks['depth']['semseg'], GlobalContext)
    assert distill.region_tasks() == {'depth'}       # semseg <- S-label of depth; depth <- its own T-label
    model = build_model('atrc', tasks, (64, 64), genotype=ids)
    assert set(model.aux_heads) == {'depth'}


def test_the_authors_genotype_files_load_as_they_are():
    """Their atrc_pascal_hrnet18.json layout ({"data": ..., "step": 40000}, ids, 'sal'): the PASCAL genotype."""
    from atrc import ATRC_PASCAL
    ids = {'semseg': [3, 3, 4, 0, 4], 'human_parts': [3, 3, 4, 3, 4], 'sal': [3, 3, 3, 4, 3],
           'normals': [3, 3, 3, 3, 4], 'edge': [3, 3, 3, 1, 3]}                   # their file, rows = target
    order = ['semseg', 'human_parts', 'sal', 'normals', 'edge']
    file = {'data': {t: dict(zip(order, row)) for t, row in ids.items()}, 'step': 40000}
    assert atrc_genotype(file, PASCAL) == ATRC_PASCAL


@pytest.mark.parametrize('genotype,message', [
    ({'semseg': {'semseg': 'global'}}, 'every\npair'.replace('\n', ' ')),
    ({'semseg': {'semseg': 'global', 'depth': 'far'}, 'depth': {'semseg': 1, 'depth': 2}}, "'far'"),
    ({'semseg': {'semseg': 7, 'depth': 1}, 'depth': {'semseg': 1, 'depth': 2}}, 'index 0..4'),
])
def test_a_bad_genotype_says_what_is_expected(genotype, message):
    with pytest.raises(ValueError, match=message):
        build_model('atrc', {'semseg': 3, 'depth': 1}, (64, 64), genotype=genotype)


# ----------------------------------------------------------------------------------------------------
# auxiliary losses on discretised targets

def test_depth_bins_are_log_spaced_over_the_range():
    depth = torch.tensor([0.0, 0.5, 0.7, 1.0, 5.0, 10.0, 20.0]).view(1, 1, 1, 7)
    expected = [255] + [max(0, min(39, math.floor(40 * math.log(d / 0.7) / math.log(10 / 0.7))))
                        for d in (0.5, 0.7, 1.0, 5.0, 10.0, 20.0)]
    assert discretise('depth', depth, depth_range=(0.7, 10.0), depth_bins=40).flatten().tolist() == expected
    assert expected[1:] == [0, 0, 5, 29, 39, 39]


def test_normals_take_the_nearest_centroid_and_kmeans_finds_separated_clusters():
    centres = F.normalize(torch.tensor([[0.0, 0, 1], [1, 0, 0.2], [-1, 0, 0.2], [0, 1, 0.3]]), dim=1)
    g = torch.Generator().manual_seed(0)
    points = F.normalize(centres.repeat_interleave(500, 0) + 0.05 * torch.randn(2000, 3, generator=g), dim=1)
    found = normals_centroids(points, k=4, seed=1)
    assert (found @ centres.T).max(1).values.min() > 0.99                  # every centre recovered
    target = torch.stack([centres[2], centres[0], torch.zeros(3)], 1).view(1, 3, 1, 3)
    labels = discretise('normals', target, normals_centroids=found).flatten().tolist()
    assert labels[2] == 255 and found[labels[0]] @ centres[2] > 0.99 and found[labels[1]] @ centres[0] > 0.99


def test_aux_loss_is_the_cross_entropy_of_the_discretised_target():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, 3, 4, generator=g)
    depth = torch.rand(2, 1, 3, 4, generator=g) * 5
    depth[0, 0, 0, 0] = 0                                                  # invalid: left out
    labels = discretise('depth', depth, depth_range=(0.7, 10.0), depth_bins=40)
    valid = labels != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid])
    assert float(aux_loss('depth', logits, depth, depth_range=(0.7, 10.0))) == pytest.approx(float(expected))
    edge = (torch.rand(2, 1, 3, 4, generator=g) > 0.7).float()
    two = torch.randn(2, 2, 3, 4, generator=g)
    p = -F.log_softmax(two, 1)
    by_hand = (0.95 * p[:, 1][edge[:, 0] == 1].sum() + 0.05 * p[:, 0][edge[:, 0] == 0].sum()) / edge.numel()
    assert float(aux_loss('edge', two, edge)) == pytest.approx(float(by_hand))


def test_global_context_never_forms_an_l_by_l_tensor():
    """NYUv2 at 1/4 (72 x 96: L = 6,912), batch 8: nothing autograd keeps has L x L entries (one image's
    would be 191 MB), and the peak memory of a forward+backward stays far below one L x L batch tensor
    (1,458 MB; measured: about 300 MB). For comparison the local context peaks near 1.8 GB there (81
    window copies of its 33-channel maps)."""
    from profile import measure
    torch.manual_seed(0)
    block = GlobalContext(67, 33)
    target, source = (torch.randn(8, 67, 72, 96, requires_grad=True) for _ in range(2))
    L = 72 * 96
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        block(target, source)
    assert max(saved) < L * L
    seconds, peak = measure(lambda: block(target, source).square().mean().backward(), 'cpu', 1)
    assert peak < 8 * L * L * 4 / 3


# ----------------------------------------------------------------------------------------------------
# the architecture search

def test_search_schedules_at_start_middle_and_end():
    from atrc import ATRCDistillation
    distill = ATRCDistillation(['semseg', 'depth'], None, 8, 4, search=True)

    def schedule(progress):
        weight = distill.schedule(progress)
        return distill.tau, weight
    assert schedule(0) == (1.0, -0.02)
    tau, weight = schedule(0.5)
    assert tau == pytest.approx(0.525) and weight == pytest.approx(0.02)
    tau, weight = schedule(1)
    assert tau == pytest.approx(0.05) and weight == pytest.approx(0.06)
    assert schedule(0.25)[1] == pytest.approx(0.0)                         # negative for the first quarter


def test_search_blocks_offer_their_candidates_freeze_at_the_margin_and_take_the_argmax_at_eval():
    from atrc import SearchedContext
    torch.manual_seed(0)
    diagonal, pair = SearchedContext(6, 4, diagonal=True), SearchedContext(6, 4, diagonal=False)
    assert diagonal.kinds == ('none', 'global', 'local', 'tlabel') and len(pair.arch_logits) == 5
    t, s, r = torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4), torch.rand(2, 3, 12).softmax(-1)
    w = pair.mixture(tau=1.0)
    assert w.sum().item() == pytest.approx(1.0) and (w > 0).all() and not pair.frozen.any()    # sampled
    with torch.no_grad():
        pair.arch_logits.copy_(torch.tensor([0.0, 0.0, 1.2, 0.0, 0.0]))   # softmax: top two 0.454 / 0.137
    pair.eval()
    assert pair.mixture(1.0).tolist() == [0, 0, 1, 0, 0] and not pair.frozen.any()      # eval: argmax only
    assert pair.choice() == 'local'
    pair.train()
    pair.mixture(1.0)
    assert pair.frozen.tolist() == [0, 0, 1, 0, 0]                         # margin >= 0.3: frozen for good
    with torch.no_grad():
        pair.arch_logits.copy_(torch.tensor([5.0, 0, 0, 0, 0]))
    assert pair.choice() == 'local' and pair.mixture(1.0).tolist() == [0, 0, 1, 0, 0]
    expected = pair.ops[1](t, s, r)
    torch.testing.assert_close(pair(t, s, r, r, tau=1.0), expected)       # the frozen op alone
    with torch.no_grad():
        diagonal.arch_logits.copy_(torch.tensor([0.0, 0.0, 0.0, 0.9]))      # 0.451 / 0.183: not yet
    diagonal.mixture(1.0)
    assert not diagonal.frozen.any()


def test_search_finds_a_genotype_that_the_fixed_model_retrains(synthetic_root, tmp_path):
    """A short search on synthetic rooms reduces the loss and writes genotype.json after each evaluation;
    --genotype=that file builds the fixed model of that genotype."""
    import train
    root = synthetic_root
    out = str(tmp_path / 'search')
    args = [f'--data_root={root}', '--n_train=8', '--n_val=4', '--synthetic_size=32x64', '--batch_size=8',
            '--vis_images=0', '--log_interval=1', '--lr=1e-3', '--model=atrc', '--search=True',
            '--grad_clip=10', '--scheduler=none', '--augment=False']
    assert train.main(args + [f'--out_dir={out}', '--epochs=6', '--eval_interval=3']) == 0
    losses = [json.loads(line)['loss'] for line in open(os.path.join(out, 'log.jsonl')) if '"train"' in line]
    assert losses[-1] < 0.8 * losses[0], losses
    with open(os.path.join(out, 'genotype.json')) as f:
        genotype = json.load(f)
    assert set(genotype) == {'semseg', 'depth', 'normals'} and genotype['depth']['depth'] != 'slabel'
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ckpt['own_optimizer'] is not None                      # the search's Adam over the arch logits
    fixed = str(tmp_path / 'fixed')
    assert train.main(args[:-5] + ['--model=atrc', f'--genotype={out}/genotype.json', f'--out_dir={fixed}',
                                   '--epochs=1']) == 0
    with open(os.path.join(fixed, 'config.json')) as f:
        assert json.load(f)['genotype'] == genotype


def test_a_search_resumes_exactly(synthetic_root, tmp_path, monkeypatch):
    """Ctrl-C mid-epoch, then --resume=True: the losses, the temperature schedule, the frozen blocks and the
    architecture optimiser continue as if uninterrupted (exact equality on CPU)."""
    import signal
    import train
    root = synthetic_root
    args = [f'--data_root={root}', '--n_train=8', '--n_val=4', '--synthetic_size=32x64', '--batch_size=2',
            '--vis_images=0', '--log_interval=1', '--lr=1e-3', '--model=atrc', '--search=True',
            '--epochs=2', '--max_steps_per_epoch=3']
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    assert train.main(args + [f'--out_dir={whole}']) == 0
    compute, calls = train.compute_losses, {'n': 0}

    def ctrl_c_in_step_4(*a):
        calls['n'] += 1
        if calls['n'] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return compute(*a)
    monkeypatch.setattr(train, 'compute_losses', ctrl_c_in_step_4)
    assert train.main(args + [f'--out_dir={parts}']) == 130
    monkeypatch.setattr(train, 'compute_losses', compute)
    assert train.main(args + [f'--out_dir={parts}', '--resume=True']) == 0
    read = lambda out: [(r['step'], r['loss']) for r in map(json.loads, open(os.path.join(out, 'log.jsonl')))
                        if r['type'] == 'train']
    assert read(parts) == read(whole)
    final = [torch.load(os.path.join(d, 'ckpt.pt'), weights_only=False)['model'] for d in (whole, parts)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])    # arch logits and frozen buffers too
    assert open(os.path.join(parts, 'genotype.json')).read() == open(os.path.join(whole, 'genotype.json')).read()


def test_pascal_config_trains_atrc_on_hrnet_with_every_auxiliary_loss(tmp_path):
    """configs/pascal_atrc.py (HRNet-18, the authors' PASCAL genotype: all five tasks' auxiliary heads,
    saliency and edge as 2-class regions) trains and evaluates on the PASCAL_MT fixture."""
    import numpy as np
    import train
    from conftest import write_pascal_sample
    root = str(tmp_path / 'PASCAL_MT')
    rng = np.random.default_rng(0)
    for i in range(2):
        write_pascal_sample(root, f'2008_00000{i}', (40, 48), rng, person=i == 0)
    write_pascal_sample(root, '2009_000000', (48, 40), rng, split='val')
    out = tmp_path / 'out'
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'pascal_atrc.py')
    assert train.main([config, f'--data_root={root}', f'--out_dir={out}', '--img_size=(64, 64)', '--epochs=1',
                       '--batch_size=2', '--num_workers=0', '--vis_images=0', '--log_interval=1']) == 0
    with open(out / 'results.json') as f:
        res = json.load(f)
    assert tuple(res['final']['metrics']) == tuple(PASCAL) and res['config']['backbone'] == 'hrnet18'
    assert sorted(os.listdir(root)).count('json') == 1 and any(f.startswith('atrc_label_spaces') for f in os.listdir(root))


def test_a_search_with_frozen_blocks_trains_under_torchrun(synthetic_root, tmp_path):
    """2 gloo processes: a frozen block runs one context and leaves the others' parameters without a
    gradient, and the entropy term reads the architecture logits; DDP takes both (every use is inside
    forward, unused parameters are expected). Every block is frozen at the first step here (margin -1)."""
    import subprocess
    import sys
    root = synthetic_root
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    driver = tmp_path / 'freeze_at_once.py'
    driver.write_text("import sys, atrc, train\natrc.FREEZE_MARGIN = -1.0\nsys.exit(train.main(sys.argv[1:]))\n")
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(driver),
           f'--data_root={root}', '--n_train=8', '--n_val=4', '--synthetic_size=32x64', '--batch_size=4',
           '--model=atrc', '--search=True', '--epochs=1', '--max_steps_per_epoch=2', '--vis_images=0',
           f'--out_dir={tmp_path / "out"}']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=here)
    run = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '2 process(es)' in run.stdout
    genotype = json.loads((tmp_path / 'out' / 'genotype.json').read_text())
    assert {c for row in genotype.values() for c in row.values()} == {'none'}     # argmax of equal logits
