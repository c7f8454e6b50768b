"""Architecture families, one file each. Importing a file registers its variants; every family's
module implements the model contract of contract.py (docs/models.md)."""
