"""Pseudo masks: the image-level classifier with peak stimulation, peak response maps, proposals,
and the distributed stage that writes pseudo instance masks into shards."""
