"""The foundation every layer uses: errors, typed rows and markers, atomic writes, paths."""
