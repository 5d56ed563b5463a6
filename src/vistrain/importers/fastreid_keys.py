"""Facts about fast-reid (v1): the defaults of the keys the mapping reads (fastreid/config/defaults.py), where its
data sets lie under $FASTREID_DATASETS and how many training images they hold (fastreid/data/datasets/*.py), and why
its other keys have no vistrain equivalent."""

from __future__ import annotations

DEFAULTS = {
    "MODEL.META_ARCHITECTURE": "Baseline", "MODEL.FREEZE_LAYERS": [], "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.BACKBONE.DEPTH": "50x", "MODEL.BACKBONE.LAST_STRIDE": 1, "MODEL.BACKBONE.FEAT_DIM": 2048,
    "MODEL.BACKBONE.NORM": "BN", "MODEL.BACKBONE.WITH_IBN": False, "MODEL.BACKBONE.WITH_SE": False,
    "MODEL.BACKBONE.WITH_NL": False, "MODEL.BACKBONE.PRETRAIN": False, "MODEL.BACKBONE.PRETRAIN_PATH": "",
    "MODEL.HEADS.NAME": "EmbeddingHead", "MODEL.HEADS.NORM": "BN", "MODEL.HEADS.NUM_CLASSES": 0,
    "MODEL.HEADS.EMBEDDING_DIM": 0, "MODEL.HEADS.WITH_BNNECK": False, "MODEL.HEADS.NECK_FEAT": "before",
    "MODEL.HEADS.POOL_LAYER": "GlobalAvgPool", "MODEL.HEADS.CLS_LAYER": "Linear", "MODEL.HEADS.MARGIN": 0.0,
    "MODEL.HEADS.SCALE": 1, "MODEL.LOSSES.NAME": ["CrossEntropyLoss"], "MODEL.LOSSES.CE.EPSILON": 0.0,
    "MODEL.LOSSES.CE.ALPHA": 0.2, "MODEL.LOSSES.CE.SCALE": 1.0, "MODEL.LOSSES.TRI.MARGIN": 0.3,
    "MODEL.LOSSES.TRI.NORM_FEAT": False, "MODEL.LOSSES.TRI.HARD_MINING": False, "MODEL.LOSSES.TRI.SCALE": 1.0,
    "MODEL.PIXEL_MEAN": [0.485 * 255, 0.456 * 255, 0.406 * 255],
    "MODEL.PIXEL_STD": [0.229 * 255, 0.224 * 255, 0.225 * 255],
    "INPUT.SIZE_TRAIN": [256, 128], "INPUT.SIZE_TEST": [256, 128], "INPUT.CROP.ENABLED": False,
    "INPUT.CROP.SIZE": [224, 224], "INPUT.CROP.SCALE": [0.16, 1], "INPUT.CROP.RATIO": [3.0 / 4.0, 4.0 / 3.0],
    "INPUT.FLIP.ENABLED": False, "INPUT.FLIP.PROB": 0.5, "INPUT.PADDING.ENABLED": False,
    "INPUT.PADDING.MODE": "constant", "INPUT.PADDING.SIZE": 10, "INPUT.CJ.ENABLED": False, "INPUT.CJ.PROB": 0.5,
    "INPUT.CJ.BRIGHTNESS": 0.15, "INPUT.CJ.CONTRAST": 0.15, "INPUT.CJ.SATURATION": 0.1, "INPUT.CJ.HUE": 0.1,
    "INPUT.AFFINE.ENABLED": False, "INPUT.AUTOAUG.ENABLED": False, "INPUT.AUGMIX.ENABLED": False,
    "INPUT.REA.ENABLED": False, "INPUT.REA.PROB": 0.5, "INPUT.REA.VALUE": [0.485 * 255, 0.456 * 255, 0.406 * 255],
    "INPUT.RPT.ENABLED": False,
    "DATASETS.NAMES": ["Market1501"], "DATASETS.TESTS": ["Market1501"], "DATASETS.COMBINEALL": False,
    "DATALOADER.SAMPLER_TRAIN": "TrainingSampler", "DATALOADER.NUM_INSTANCE": 4, "DATALOADER.NUM_WORKERS": 8,
    "SOLVER.AMP.ENABLED": False, "SOLVER.OPT": "Adam", "SOLVER.MAX_EPOCH": 120, "SOLVER.BASE_LR": 3e-4,
    "SOLVER.HEADS_LR_FACTOR": 1.0, "SOLVER.MOMENTUM": 0.9, "SOLVER.NESTEROV": False, "SOLVER.WEIGHT_DECAY": 0.0005,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0005, "SOLVER.BIAS_LR_FACTOR": 1.0, "SOLVER.WEIGHT_DECAY_BIAS": 0.0005,
    "SOLVER.SCHED": "MultiStepLR", "SOLVER.DELAY_EPOCHS": 0, "SOLVER.GAMMA": 0.1, "SOLVER.STEPS": [30, 55],
    "SOLVER.ETA_MIN_LR": 1e-7, "SOLVER.WARMUP_FACTOR": 0.1, "SOLVER.WARMUP_ITERS": 1000,
    "SOLVER.WARMUP_METHOD": "linear", "SOLVER.FREEZE_ITERS": 0, "SOLVER.CHECKPOINT_PERIOD": 20,
    "SOLVER.IMS_PER_BATCH": 64, "SOLVER.CLIP_GRADIENTS.ENABLED": False, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "norm",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 5.0, "TEST.EVAL_PERIOD": 20, "TEST.IMS_PER_BATCH": 64,
    "TEST.METRIC": "cosine", "TEST.FLIP.ENABLED": False, "TEST.RERANK.ENABLED": False, "TEST.RERANK.K1": 20,
    "TEST.RERANK.K2": 6, "TEST.RERANK.LAMBDA": 0.3,
}
# name -> (folder under $FASTREID_DATASETS, train, query, gallery folders); MSMT17 and others are list files
LAYOUTS = {"Market1501": ("Market-1501-v15.09.15", "bounding_box_train", "query", "bounding_box_test"),
           "DukeMTMC": ("DukeMTMC-reID", "bounding_box_train", "query", "bounding_box_test"),
           "VeRi": ("veri", "image_train", "image_query", "image_test")}
# training images per data set (the counts in fastreid/data/datasets/*.py): an epoch is images // IMS_PER_BATCH
TRAIN_IMAGES = {"Market1501": 12936, "DukeMTMC": 16522, "MSMT17": 32621, "VeRi": 37778}
POOLS = {"GlobalAvgPool": "avg", "avgpool": "avg", "GlobalMaxPool": "max", "maxpool": "max",
         "GeneralizedMeanPooling": "gem", "GeneralizedMeanPoolingP": "gem", "gempool": "gem", "gempoolP": "gem",
         "AdaptiveAvgMaxPool": "avgmax", "avgmaxpool": "avgmax"}
REASONS = {
    "MODEL.WEIGHTS": "a fast-reid checkpoint of the whole model: vistrain starts from model.pretrained_path (a "
                     "backbone's state_dict) or model.init_from (a vistrain run)",
    "MODEL.QUEUE_SIZE": "no MoCo memory queue in vistrain",
    "KD.MODEL_CONFIG": "no knowledge distillation in vistrain",
    "KD.MODEL_WEIGHTS": "no knowledge distillation in vistrain",
    "SOLVER.SWA.ENABLED": "no stochastic weight averaging in vistrain (train.ema averages the weights)",
    "SOLVER.MAX_ITER": "fast-reid before v1 counted iterations: set train.epochs",
    "TEST.ROC.ENABLED": "vistrain's re-ID evaluation reports CMC, mAP and mINP, not ROC curves",
    "TEST.AQE.ENABLED": "no query expansion in vistrain",
    "TEST.PRECISE_BN.ENABLED": "no precise BatchNorm statistics in vistrain",
    "DATALOADER.SET_WEIGHT": "vistrain's P x K sampler weighs every identity the same",
    "OUTPUT_DIR": "vistrain writes each run under output.exp_dir/YYYYMMDD/<run_id>/",
}
