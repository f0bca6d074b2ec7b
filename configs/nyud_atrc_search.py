# ATRC's architecture search (ATRC Sec. 3.3); retrain what it finds with
# configs/nyud_atrc.py --genotype=out/nyud_atrc_search/genotype.json
# NYUD-v2 as ATRC and TIF report it (the NYUD_MT release: 795 train / 654 val, 425x560, 40 classes, depth, normals,
# edges), HRNet-18, ATRC's recipe (brdav/atrc config/nyud/hrnet18/*.yaml, src/model/pl_model.py; ATRC paper Sec. 4.1):
# SGD (momentum 0.9), lr 0.01, weight decay 5e-4, poly LR (power 0.9) after every iteration, batch 8, loss weights
# semseg 1, depth 1, normals 10, edge 50, normals L1, ATRC's augmentation (data.atrc_augment); evaluated every
# 10 epochs (theirs: check_val_every_n_epoch 10). Delta_m against ATRC Tab. 1's single task (semseg mIoU, depth
# RMSE, normals mean; their 4th task's odsF needs the external SEISM benchmark: the edge row is the val loss).
model = 'atrc'
search = True
grad_clip = 10.0     # their search configs clip at 10
out_dir = 'out/nyud_atrc_search'
dataset = 'nyud'
data_root = 'data/NYUD_MT'
backbone = 'hrnet18'
pretrained = None    # the papers start from ImageNet weights: --pretrained=PATH/TO/hrnet_w18_small_v2.pth
optimizer = 'sgd'
lr = 0.01
weight_decay = 5e-4
scheduler = 'poly'
iters = 40000
batch_size = 8
eval_interval = 10
loss_weights = {'semseg': 1.0, 'depth': 1.0, 'normals': 10.0, 'edge': 50.0}
normals_loss = 'l1'
num_workers = 4
