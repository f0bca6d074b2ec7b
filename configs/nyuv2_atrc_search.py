# ATRC's architecture search (Bruggemann et al. ICCV 2021, Sec. 3.3: Gumbel-softmax over the contexts of every
# pair, temperature 1 -> 0.05, entropy weight -0.02 -> 0.06, blocks frozen at a 0.3 margin). Its paper searches
# with SGD for 40k iterations; this config keeps the recipe every other model here trains with (theirs: add
# configs/recipe_atrc.py).
# NYUv2 (MTAN .npy, 288x384, 795 train / 654 val), HRNet-18,
# the recipe of the authors' CNN code (CTAL paper Sec. 3 and appendix).
dataset = 'nyuv2'
data_root = 'data/nyuv2'
model = 'atrc'
search = True   # ATRC's architecture search; the genotype found goes to out_dir/genotype.json, retrain it
                     # with configs/nyuv2_atrc.py --genotype=out/nyuv2_atrc_search/genotype.json
grad_clip = 10.0     # the authors' search configs clip at 10
out_dir = 'out/nyuv2_atrc_search'
backbone = 'hrnet18'
pretrained = None    # the papers start from ImageNet weights: --pretrained=PATH/TO/hrnet_w18_small_v2.pth
epochs = 200
batch_size = 8
lr = 1e-4
weight_decay = 1e-4
scheduler = 'cosine'
loss_weights = {'semseg': 1.0, 'depth': 1.0, 'normals': 1.0}
num_workers = 4
