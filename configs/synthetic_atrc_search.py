# The embedded default: procedurally rendered rooms (synthetic.make_synthetic, generated into data_root if
# absent), trained from scratch and evaluated on a 2-core CPU in a few minutes. stl / mtl / ctal_ss / tif / atrc
# share this recipe, so their results compare side by side (delta_m against the STL run's results).
dataset = 'synthetic'
data_root = 'data/synthetic'
n_train = 320
n_val = 100
synthetic_size = (96, 128)
model = 'atrc'
search = True            # the architecture search; then train.py ... --genotype=OUT/genotype.json
grad_clip = 10.0         # the search's clipping (the authors' search configs)
epochs = 5
batch_size = 8
lr = 1e-3                # from scratch (no ImageNet weights): higher than the papers' 1e-4
hrnet_bn_momentum = 0.1  # 200 steps: with the authors' 0.01 the eval-mode BN statistics lag (mIoU 2.9 vs 19.2)
weight_decay = 1e-4
scheduler = 'cosine'
loss_weights = {'semseg': 1.0, 'depth': 1.0, 'normals': 1.0}
eval_interval = 1
log_interval = 10
num_workers = 0
stl_results = 'out/synthetic_stl/results.json'    # delta_m reference, once configs/synthetic_stl.py has run
