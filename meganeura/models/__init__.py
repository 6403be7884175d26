"""Model families, one file each, with their loaders beside them."""
