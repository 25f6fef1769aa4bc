"""transferlab: a reproducible DVC + MLflow pipeline for transfer learning on images."""
