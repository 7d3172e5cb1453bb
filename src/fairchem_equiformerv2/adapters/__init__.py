"""What fairchem sees: the model's classes with fairchem's interfaces and neighbour search, one module
per fairchem major version (:mod:`.fairchem1`, :mod:`.fairchem2`). Each imports its fairchem."""
