"""Running a plan of shards: the backend choice, local and Ray backends, progress."""
