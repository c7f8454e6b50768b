"""Architecture families, one file each. Importing a file registers its variants."""
