"""Video branch: ID-Crafter on Wan 2.1."""
