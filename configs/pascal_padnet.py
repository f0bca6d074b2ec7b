# PASCAL-Context (PASCAL_MT, padded to 512x512, 4998 train / 5105 val), Swin-V2-S, SPEC section 7 recipe.
dataset = 'pascal'
data_root = 'data/PASCAL_MT'
model = 'padnet'
backbone = 'swinv2_s'
pretrained = None    # the papers start from ImageNet weights: --pretrained=PATH/TO/swinv2_small_window8_256.pth
epochs = 70
batch_size = 8
lr = 2e-5
weight_decay = 1e-5
scheduler = 'cosine'
grad_clip = 10.0
num_workers = 4
