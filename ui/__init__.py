"""Streamlit UI: review batch runs, annotate units, look up similar images, analyse a new image.

Everything that is not a page (storage access, annotations, overlays, agreement) is plain Python
without Streamlit imports, so it is testable and reusable; the pages live in ``ui/views``.
"""
