"""Video and shard I/O: ffmpeg decode/encode, input shards, output shards, packing a folder."""
