# ATRC's training recipe (brdav/atrc config/nyud/hrnet18/*.yaml and src/model/pl_model.py; ATRC paper Sec. 4.1),
# to layer over a dataset/model config:   python train.py configs/nyuv2_atrc.py configs/recipe_atrc.py
# SGD (momentum 0.9), lr 0.01, weight decay 5e-4, polynomial decay (power 0.9) stepped after every iteration over
# 40,000 iterations, global batch 8. PASCAL-Context: their config/pascal uses lr 0.005 (add --lr=0.005).
optimizer = 'sgd'
lr = 0.01
weight_decay = 5e-4
scheduler = 'poly'
iters = 40000
batch_size = 8
