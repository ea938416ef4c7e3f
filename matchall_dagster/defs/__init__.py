"""The project's components, one folder each (`dg.load_from_defs_folder`)."""
