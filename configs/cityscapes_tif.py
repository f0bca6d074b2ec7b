# TIF (Task-Interaction-Free network) publishes no code; its paper trains with ATRC's recipe for 50k iterations.
# This config keeps the recipe every other model here trains with, so the rows compare; the paper's: add
# configs/recipe_tif.py.
# Cityscapes (MTAN .npy, 128x256, 2975 train / 500 val, 19 classes), HRNet-18,
# the recipe of the authors' CNN code (CTAL paper Sec. 3 and appendix).
dataset = 'cityscapes'
data_root = 'data/cityscapes'
model = 'tif'
backbone = 'hrnet18'
pretrained = None    # the papers start from ImageNet weights: --pretrained=PATH/TO/hrnet_w18_small_v2.pth
epochs = 75
batch_size = 8
lr = 5e-4
weight_decay = 1e-4
scheduler = 'cosine'
loss_weights = {'semseg': 1.0, 'depth': 10.0}
num_workers = 4
