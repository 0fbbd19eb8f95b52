"""Model definitions, the bundle format and preprocessing: what a trained model is, independent of serving."""
