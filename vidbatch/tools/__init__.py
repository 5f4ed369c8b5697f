"""Command-line tools built on the library: `vidbatch bench`."""
