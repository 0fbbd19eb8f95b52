"""Results as standard DICOM objects (highdicom builders, torch-free): SR, Parametric Maps, RGB overlays."""
