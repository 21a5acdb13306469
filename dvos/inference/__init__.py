"""Frame-by-frame inference with bounded memory and background writing of results."""
