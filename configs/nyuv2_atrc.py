# ATRC (Adaptive Task-Relational Context, Bruggemann et al. ICCV 2021) with the authors' searched HRNet-18
# genotype; its paper trains with SGD for 40k iterations: this config keeps the recipe every other model here
# trains with, so the rows compare; theirs: add configs/recipe_atrc.py.
# NYUv2 (MTAN .npy, 288x384, 795 train / 654 val), HRNet-18,
# the recipe of the authors' CNN code (CTAL paper Sec. 3 and appendix).
dataset = 'nyuv2'
data_root = 'data/nyuv2'
model = 'atrc'
backbone = 'hrnet18'
pretrained = None    # the papers start from ImageNet weights: --pretrained=PATH/TO/hrnet_w18_small_v2.pth
epochs = 200
batch_size = 8
lr = 1e-4
weight_decay = 1e-4
scheduler = 'cosine'
loss_weights = {'semseg': 1.0, 'depth': 1.0, 'normals': 1.0}
num_workers = 4
