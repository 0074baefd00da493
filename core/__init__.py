"""Infrastructure shared by every entry point: the configuration, errors, files, device, run directory."""
