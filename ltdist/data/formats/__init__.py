"""Source readers for the shard writer: each turns a raw dataset into class names and
``SourceSample`` lists per split (see :mod:`ltdist.data.writer`)."""
