"""What every stage shares, and nothing stage-specific: the shard format (`shards`), where its files
live (`storage`: paths and URIs, atomic writes), instance masks as COCO RLE (`masks`), the Ray
placement of stage work (`resources`), the run folder of a Ray Train stage (`run_folder`) and the
failures a user can act on (`errors`)."""
