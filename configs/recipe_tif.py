# TIF's training recipe (TIF paper Sec. 4.1: ATRC's recipe for 50,000 iterations; no code is public), to layer
# over a dataset/model config:   python train.py configs/nyuv2_tif.py configs/recipe_tif.py
# SGD (momentum 0.9), lr 0.01 on HRNet-18 (the paper: 0.001 on Swin, add --lr=0.001), weight decay 5e-4,
# polynomial decay (power 0.9) stepped after every iteration, global batch 8.
optimizer = 'sgd'
lr = 0.01
weight_decay = 5e-4
scheduler = 'poly'
iters = 50000
batch_size = 8
