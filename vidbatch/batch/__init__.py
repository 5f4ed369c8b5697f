"""One shard end to end: dataset, Lightning module, prediction writer."""
