"""Small shared pieces: user-facing errors, atomic writes, palette masks, run metadata."""
