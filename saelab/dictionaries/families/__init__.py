"""One module per dictionary family; each registers its `Family` (see saelab.dictionaries.registry).

Every module here is imported when saelab.dictionaries is: a new file is a new family.
"""
