"""Ingest: everything that turns the outside world (search engines, URL lists, VOC/COCO folders,
the synthetic world) into maskless shards, plus the shard format every later stage reads."""
