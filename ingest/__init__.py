"""Ingest: getting data in. Crawling by keyword or URL list (`crawl` and its steps), PASCAL VOC and
COCO import, and the synthetic world; everything lands in the shard format of maskless.core."""
