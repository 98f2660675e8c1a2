"""Train: Mask R-CNN on (pseudo or true) instance masks with Ray Train, prediction, VOC evaluation and reports."""
