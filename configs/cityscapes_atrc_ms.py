# ATRC + FPM (ATRC paper Tab. 2): MTI-Net's front end, then ATRC with the authors' searched HRNet-18 genotype.
# Its paper trains with SGD for 40k iterations; this config keeps the recipe every other model here trains with
# (theirs: add configs/recipe_atrc.py).
# Cityscapes (MTAN .npy, 128x256, 2975 train / 500 val, 19 classes), HRNet-18,
# the recipe of the authors' CNN code (CTAL paper Sec. 3 and appendix).
dataset = 'cityscapes'
data_root = 'data/cityscapes'
model = 'atrc_ms'
backbone = 'hrnet18'
pretrained = None    # the papers start from ImageNet weights: --pretrained=PATH/TO/hrnet_w18_small_v2.pth
epochs = 75
batch_size = 8
lr = 5e-4
weight_decay = 1e-4
scheduler = 'cosine_restarts'   # MS models: warm restarts, T_0 = epochs // 3 (restart_period = None)
loss_weights = {'semseg': 1.0, 'depth': 10.0}
restart_mult = 2
num_workers = 4
