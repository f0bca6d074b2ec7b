# PASCAL-Context (PASCAL_MT, 4998 train / 5105 val), Swin-V2-S: the recipe of the CTAL authors' transformer code
# (code_transformer/configs/pascal/swinv2/*.yml; CTAL paper Sec. 3 and appendix). Training samples: random scale 0.5-2, crop
# 512x512, flip, photometric distortion (data.atrc_augment); validation: padded centred to 512x512.
dataset = 'pascal'
data_root = 'data/PASCAL_MT'
model = 'mtl'
backbone = 'swinv2_s'
pretrained = None    # the papers start from ImageNet weights: --pretrained=PATH/TO/swin_v2_s-6cf4c8c5.pth (torchvision's ImageNet weights)
epochs = 70
batch_size = 8
lr = 2e-5
weight_decay = 1e-5
scheduler = 'cosine'
grad_clip = 0.0     # their configs name max_norm 10, but no code of theirs reads it: they did not clip
loss_weights = {'semseg': 1.0, 'human_parts': 2.0, 'saliency': 5.0, 'edge': 50.0, 'normals': 10.0}
normals_loss = 'l1'  # their transformer code: L1 of the normalised prediction, summed over x, y, z
num_workers = 4
